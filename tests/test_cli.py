"""The installed `p2p` command, run as a user would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pix2pix

P2P = Path(sys.executable).parent / "p2p"


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(P2P), *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_help_lists_the_verbs() -> None:
    result = run("--help")
    assert result.returncode == 0
    assert "version" in result.stdout and "demo" in result.stdout


def test_no_verb_prints_help_and_fails() -> None:
    result = run()
    assert result.returncode == 2
    assert "usage: p2p" in result.stdout


def test_version() -> None:
    result = run("version")
    assert result.returncode == 0
    assert result.stdout.startswith(f"p2p {pix2pix.__version__}")
    assert "torch" in result.stdout and "ray 2.60" in result.stdout


def test_demo_trains_and_writes_a_checkpoint_and_grid(tmp_path: Path) -> None:
    result = run("demo", "--smoke", "--steps", "3", "--output-dir", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr
    assert "held-out crops" in result.stdout
    assert (tmp_path / "demo" / "checkpoint.pt").stat().st_size > 1_000_000
    grid = (tmp_path / "demo" / "samples.png").read_bytes()
    assert grid.startswith(b"\x89PNG")
    _, config = pix2pix.load_generator(tmp_path / "demo" / "checkpoint.pt")
    assert config.input_nc == 1 and config.output_nc == 3
