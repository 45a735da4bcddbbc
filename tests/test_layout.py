"""The shape of the code: jobs stand side by side on shared components, and the library stays pure torch.

A job is a module a verb runs; it may import shared components (storage, manifest, preprocessing, listing,
tracking, models, scoring, loader, ...) but never another job: the CLI and the demo orchestrate them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JOBS = {
    "pipelines.dataset.build",
    "pipelines.training.train",
    "pipelines.registry.evaluate",
    "pipelines.registry.promote",
    "pipelines.inference.translate",
    "pipelines.cluster.submit",
    "pipelines.quality.train_segmenter",
}
ORCHESTRATORS = {"pipelines.cli", "pipelines.demo", "pipelines.sweep"}
LIBRARY_BANNED = ("ray", "mlflow", "boto3", "botocore", "pyarrow", "pipelines", "devtools")


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("job", sorted(JOBS))
def test_no_job_imports_another_job(job: str) -> None:
    path = ROOT / (job.replace(".", "/") + ".py")
    assert path.is_file(), f"{job} moved: update JOBS"
    others = {name for name in imports(path) if name in JOBS - {job}}
    assert not others, f"{job} imports the job(s) {sorted(others)}: move what they share into a component"


def test_only_the_orchestrators_import_jobs() -> None:
    for path in sorted((ROOT / "pipelines").rglob("*.py")):
        name = module_name(path)
        if name in ORCHESTRATORS or name in JOBS:
            continue
        used = sorted(imports(path) & JOBS)
        assert not used, f"component {name} imports the job(s) {used}"


def test_the_library_imports_no_cluster_tracking_or_storage_code() -> None:
    for path in sorted((ROOT / "pix2pix").rglob("*.py")):
        banned = sorted(n for n in imports(path) if n.split(".")[0] in LIBRARY_BANNED)
        assert not banned, f"{module_name(path)} imports {banned}: pix2pix/ is pure torch"


def test_the_local_s3_server_is_not_product_code() -> None:
    for path in sorted((ROOT / "pipelines").rglob("*.py")):
        used = {n for n in imports(path) if n.startswith("devtools")}
        assert not used or module_name(path) == "pipelines.demo", f"{module_name(path)} imports {used}"
