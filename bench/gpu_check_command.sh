#!/usr/bin/env bash
# Issue 10's GPU check on a bare device machine, run from the repository root:
#   run(command="bash bench/gpu_check_command.sh", carry=[".whl"], timeout_s=540)
# Arguments go to bench.gpu_check, e.g. `bash bench/gpu_check_command.sh --sections env,compile,data,tests`.
# The machine has CUDA torch, opencv, pyarrow, h5py, numpy, scipy, pytest but not webdataset/albumentations:
# .whl/ (ignored by git, so it must be carried) holds them and their dependencies as cp312 manylinux
# wheels, including typing_extensions 4.16 because pydantic 2.14 needs it. Results: $OUT/gpu_check.jsonl.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
python3 -m bench.gpu_check "${OUT:-gpu_check_out}" --device cuda "$@"
