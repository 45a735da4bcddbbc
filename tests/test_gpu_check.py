"""bench.gpu_check end to end on the CPU with --quick: every section is there, with sane values."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

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


def read_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]


# Every goal field the summary writes, measured or not (null where this run could not judge it).
GOAL_FIELDS = {
    "best_samples_per_s",
    "reference_samples_per_s",
    "goal_ratio_20x",
    "goal_2500_samples_per_s",
    "goal_gpu_busy_90_pct",
    "goal_hed_1000_images_per_s",
    "goal_hed_reason",
}


def test_a_failing_section_never_costs_the_summary(tmp_path: Path) -> None:
    # Weights that do not load: the HED section fails and records an error under "hed", the name its
    # measurements use, but without their fields.
    bad = tmp_path / "broken.weights.h5"
    bad.write_bytes(b"not an h5 file")
    out = tmp_path / "out"
    proc = run_check(
        out, "--device", "cpu", "--quick", "--sections", "env,step,hed", "--hed-weights", str(bad)
    )
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    records = read_records(out)
    assert [r for r in records if r["section"] == "hed" and "error" in r]
    summary = [r for r in records if r["section"] == "summary"]
    assert len(summary) == 1 and "error" not in summary[0], summary
    assert set(summary[0]) >= GOAL_FIELDS
    assert summary[0]["best_samples_per_s"] > 0 and summary[0]["goal_hed_1000_images_per_s"] is None
    assert "not measured" in summary[0]["goal_hed_reason"]
    assert records[-1]["section"] == "done" and records[-1]["failures"] == ["hed"]
    assert "== gpu_check summary ==" in proc.stdout and "hed failed:" in proc.stdout


def test_random_hed_weights_judge_no_goal(tmp_path: Path) -> None:
    proc = run_check(
        tmp_path, "--device", "cpu", "--quick", "--sections", "hed", "--hed-weights", "/nowhere.h5"
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    records = read_records(tmp_path)
    actor = next(r for r in records if r.get("path") == "split_build_actor")
    assert actor["real_weights"] is False and actor["images_per_s"] > 0
    summary = next(r for r in records if r["section"] == "summary")
    assert summary["goal_hed_1000_images_per_s"] is None and "random weights" in summary["goal_hed_reason"]
    assert summary["hed_split_build_actor_images_per_s"] == actor["images_per_s"]


def test_hed_weights_are_looked_for_in_the_checkout_first(tmp_path: Path, monkeypatch: Any) -> None:
    from bench import gpu_check

    inside, beside = tmp_path / "repo/shared/w.h5", tmp_path / "shared/w.h5"
    monkeypatch.setattr(gpu_check, "HED_WEIGHTS_SEARCH", (inside, beside))
    monkeypatch.delenv("P2P_HED_WEIGHTS", raising=False)
    assert gpu_check.default_hed_weights() == str(inside)  # neither there: the first, missing
    beside.parent.mkdir(parents=True)
    beside.write_bytes(b"h5")
    assert gpu_check.default_hed_weights() == str(beside)
    inside.parent.mkdir(parents=True)
    inside.write_bytes(b"h5")
    assert gpu_check.default_hed_weights() == str(inside)
    monkeypatch.setenv("P2P_HED_WEIGHTS", "/elsewhere.h5")
    assert gpu_check.default_hed_weights() == "/elsewhere.h5"


def test_the_budget_skips_sections_and_says_so_but_never_the_tests(tmp_path: Path) -> None:
    sections = "env,data,hed,fed,big,compile,tests"
    proc = run_check(tmp_path, "--device", "cpu", "--quick", "--budget-s", "1", "--sections", sections)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    records = read_records(tmp_path)
    skipped = {r["section"]: r["skipped"] for r in records if "skipped" in r and r["section"] != "train_step"}
    for name in ("data_shards", "hed"):
        assert skipped[name].startswith("budget:"), skipped
    assert "no shards" in skipped["data"] and "no shards" in skipped["fed"]
    big = [r for r in records if r["section"] == "train_step" and r.get("batch") == 4]
    assert big and all(r["skipped"].startswith("budget:") for r in big), big
    assert not [r for r in records if "samples_per_s" in r or "images_per_s" in r]
    # The tests ran anyway, last before the summary, with at least the time kept for them.
    assert [r["section"] for r in records[-3:]] == ["tests", "summary", "done"]
    assert records[-3]["ok"] and records[-3]["timeout_s"] >= 60


class SleepyStep:
    """A stand-in for TrainingStep: each step takes ``seconds`` on the host (the CPU path of run_steps)."""

    device = torch.device("cpu")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        time.sleep(self.seconds)
        return {}


def test_steady_rate_from_shards_counts_every_step_of_its_window() -> None:
    from bench.gpu_check import steady_samples_per_s
    from pipelines.training.loop import run_steps

    def batches() -> Any:
        time.sleep(0.2)  # the loader's start-up, before the first batch
        for _ in range(4):
            yield {"A": torch.zeros(2, 1, 4, 4), "B": torch.zeros(2, 3, 4, 4)}

    per_epoch = [run_steps(SleepyStep(0.05), batches()) for _ in range(2)]  # type: ignore[arg-type]
    # 8 samples per epoch in 4 steps of 50 ms: 40 samples/s once started (the old arithmetic said 30).
    assert 36 < steady_samples_per_s(per_epoch) <= 40.5


def test_compiled_modes_count_flops_on_an_eager_twin(monkeypatch: Any) -> None:
    from bench import gpu_check

    setup = gpu_check.make_setup(torch.device("cpu"), True, 60)
    flops = gpu_check.eager_flops_per_sample(setup, gpu_check.COMPILED, 2)
    assert flops is not None and flops > 0

    def broken(*args: Any) -> float:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(gpu_check, "count_flops", broken)
    assert gpu_check.eager_flops_per_sample(setup, gpu_check.COMPILED, 2) is None  # null, never 0


def test_the_compile_time_limit_is_no_ordinary_exception() -> None:
    from bench.gpu_check import CompileTimeout, time_limit

    # contextlib.suppress(Exception): what a broad except in dynamo or inductor does.
    with pytest.raises(CompileTimeout), time_limit(1.0), contextlib.suppress(Exception):
        time.sleep(3)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_the_device_command_stops_at_once_without_wheels(tmp_path: Path) -> None:
    (tmp_path / "bench").mkdir()
    shutil.copy(REPO_ROOT / "bench/gpu_check_command.sh", tmp_path / "bench")
    proc = subprocess.run(
        ["bash", "bench/gpu_check_command.sh"], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "gpu_check_command: no wheels in .whl/: run bench/gpu_wheels.sh first; carry .whl"
    ]
