"""bench.gpu_check end to end on the CPU with --quick: every section is there, with sane values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_check(out: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m bench.gpu_check OUT ARGS...` from the repository root, as the device machine runs it."""
    command = [sys.executable, "-m", "bench.gpu_check", str(out), *args]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def test_gpu_check_quick_on_cpu(tmp_path: Path) -> None:
    proc = run_check(tmp_path, "--device", "cpu", "--quick", timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "== gpu_check summary ==" in proc.stdout
    records = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    by_section: dict[str, list[dict]] = {}
    for r in records:
        by_section.setdefault(r["section"], []).append(r)
    assert not [r for r in records if "error" in r], [r for r in records if "error" in r]

    env = by_section["environment"][0]
    assert env["cpu_cores"] >= 1 and env["torch"] and env["python"]
    assert by_section["peak_matmul"][0]["tflops"] > 0

    steps = [r for r in by_section["train_step"] if "samples_per_s" in r]
    modes = {(r["mode"], r["batch"]) for r in steps}
    assert {("reference", 1), ("bf16_cl", 1), ("fp32", 2), ("bf16_cl", 2)} <= modes
    for r in steps:
        assert r["samples_per_s"] > 0 and r["flops_per_sample"] > 0 and r["achieved_tflops"] > 0
        assert r["mfu_vs_measured_bf16_matmul"] > 0 and r["ratio_to_reference"] > 0
        assert len(r["window_ms"]) >= 2
    # The "big" extra: the fastest eager mode one batch further (4 here; 128 on a GPU).
    assert ("bf16_cl", 4) in modes
    reference = next(r for r in steps if r["mode"] == "reference")
    assert reference["ratio_to_reference"] == 1.0 and not reference["channels_last"]
    # Compiles are measured on CUDA only: on the CPU they are listed as skipped, with the reason.
    assert all(
        r.get("skipped") for r in by_section["train_step"] if r["mode"].endswith(("compile", "graphs"))
    )

    assert by_section["data_shards"][0]["samples"] > 0
    loaders = by_section["data_loader"]
    assert {r["num_workers"] for r in loaders} >= {0} and all(
        r["samples_per_s_per_core"] > 0 for r in loaders
    )
    workers = max(r["num_workers"] for r in loaders)
    assert {(r["path"], r["num_workers"]) for r in loaders} == {
        (path, n) for path in ("old", "new") for n in (0, workers)
    }
    # The new path ships uint8 at load size (72 px), the old one float32 crops (64 px): 4 × 64² / 72² bytes.
    sizes = {r["path"]: r["batch_bytes"] for r in loaders}
    assert sizes["old"] / sizes["new"] == 4 * 64**2 / 72**2
    trains = by_section["data_train"]
    assert {r["prefetch"] for r in trains} == {True, False}
    assert {(r["path"], r["prefetch"]) for r in trains} == {("old", True), ("new", True), ("new", False)}
    for r in trains:
        assert r["steps"] > 0 and r["samples_per_s"] > 0 and r["step_alone_samples_per_s"] > 0
        assert r["steady_samples_per_s"] > 0 and r["loader_start_s"] >= 0
        assert min(r["wait_s"], r["step_s"], r["callback_s"]) >= 0 and r["step_s"] > 0
    assert by_section["data_step_alone_busy"][0]["samples_per_s"] > 0

    hed = {r["path"]: r for r in by_section["hed"]}
    assert set(hed) == {
        "soft_map",
        "network_fp32",
        "network_fp32_cl",
        "network_bf16_cl",
        "network_fp32_cudnn_benchmark",
        "postprocess_per_core",
        "postprocess_on_device",
        "full_postprocessed",
        "split_build_actor",
        "split_build_actor_cudnn_benchmark",
    }
    assert all(r["images_per_s"] > 0 for r in hed.values())
    assert hed["postprocess_on_device"]["pixels_differing_from_numpy"] == 0
    assert hed["postprocess_on_device"]["pixels_compared"] > 0

    tests = by_section["tests"][0]
    assert tests["ok"] and tests["returncode"] == 0 and tests["counts"].get("failed", 0) == 0
    summary = by_section["summary"][0]
    assert summary["best_samples_per_s"] >= summary["reference_samples_per_s"] > 0
    assert by_section["done"][0]["ok"]


def test_gpu_check_runs_only_the_sections_asked(tmp_path: Path) -> None:
    proc = run_check(tmp_path, "--device", "cpu", "--quick", "--sections", "env,peak")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert [r["section"] for r in records] == ["environment", "peak_matmul", "summary", "done"]
    bad = run_check(tmp_path, "--sections", "env,nope")
    assert bad.returncode == 2 and "nope" in bad.stderr
