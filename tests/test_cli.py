"""The installed `p2p` command, run as a user would run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

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


# `pipelines.cli.main` run as the `p2p` command, with an atexit handler and, if asked, a non-daemon thread
# started once the verb has returned, when the quick exit decides: each leaves a file behind when it ran.
QUICK_EXIT = """
import atexit, sys, threading, time
from pipelines import cli
out, thread = sys.argv[1], sys.argv[2] == "thread"
atexit.register(lambda: open(out + ".atexit", "w").write("ran"))
def late():
    time.sleep(0.3)
    open(out + ".thread", "w").write("done")
def verb_then_a_thread(argv):
    code = run_verb(argv)
    if thread:
        threading.Thread(target=late).start()
    return code
run_verb, cli.run_verb = cli.run_verb, verb_then_a_thread
sys.argv = ["p2p", *sys.argv[3:]]
sys.exit(cli.main())
"""


@pytest.mark.parametrize("thread", [False, True])
def test_the_quick_exit_still_does_what_an_exit_must(tmp_path: Path, thread: bool) -> None:
    """`p2p` skips the interpreter's teardown, not the exit's duties: the atexit handlers run, output
    buffered for a pipe arrives whole, the exit code is the verb's, output that cannot be written fails
    the exit as Python's own would (status 120), and a thread still running is waited for."""
    out = str(tmp_path / "x")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe buffers, as for users

    def p2p(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-c", QUICK_EXIT, out, "thread" if thread else "-", *args]
        streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kwargs}
        return subprocess.run(command, text=True, timeout=120, env=env, **streams)

    printed = p2p("train", "--print-config")
    assert printed.returncode == 0, printed.stderr
    config = yaml.safe_load(printed.stdout)  # whole: a cut-off YAML would not parse or lack its end
    assert config["model"]["netG"] == "unet_256" and config["seed"] == 0, printed.stdout
    failed = p2p("train", "--manifest", str(tmp_path / "none"), "--storage", str(tmp_path / "runs"))
    assert failed.returncode == 2 and "p2p train: error: no dataset manifest" in failed.stderr, failed.stderr
    assert Path(out + ".atexit").read_text() == "ran"
    assert Path(out + ".thread").exists() == thread
    with open("/dev/full", "w") as full:  # every write fails: the disk is full
        unwritten = p2p("train", "--print-config", stdout=full)
    assert unwritten.returncode == 120 and "No space left on device" in unwritten.stderr, unwritten.stderr
