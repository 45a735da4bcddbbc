#!/usr/bin/env bash
# Issue 10's GPU check on a bare device machine, run from the repository root:
#   run(command="set -o pipefail; bash bench/gpu_check_command.sh 2>&1 | tee $OUT/log.txt",
#       carry=[".whl"], timeout_s=540)
# Arguments go to bench.gpu_check, e.g. `bash bench/gpu_check_command.sh --sections env,compile,data,tests`.
# The machine has CUDA torch, opencv, pyarrow, h5py, numpy, scipy, PyYAML, pytest but not albumentations,
# which the data sections' loader imports: .whl/ holds it and its missing dependencies as cp312 manylinux
# wheels. .whl/ is ignored by git, so a fresh checkout has none: `bash bench/gpu_wheels.sh` fills it here
# (a package index is needed, which the device machine lacks) and the call must carry it.
# Results: $OUT/gpu_check.jsonl.
set -euo pipefail
shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]} == 0)); then
  echo "gpu_check_command: no wheels in .whl/: run bench/gpu_wheels.sh first; carry .whl" >&2
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "${wheels[@]}"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1
# Pre-flight: a wheel missing or built for another Python fails here in one line, not minutes into the run.
if ! err=$(python3 -c "import albumentations" 2>&1); then
  echo "gpu_check_command: albumentations does not import from /tmp/site (${err##*$'\n'});" \
    "rebuild .whl with bench/gpu_wheels.sh" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
python3 -m bench.gpu_check "${OUT:-gpu_check_out}" --device cuda "$@"
