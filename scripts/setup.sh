#!/usr/bin/env bash
# Creates .venv and installs the project with its test tools. Safe to re-run: it only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: on CPU-only machines pip's find-links offers the local 2.13.0 CPU wheel, and an
# unpinned torch would pull several GB of CUDA wheels. Set TORCH_SPEC to choose another build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "[setup] installing ${TORCH_SPEC:-torch==2.13.0}"
  # Unquoted: TORCH_SPEC may carry pip options, e.g. "torch==2.13.0 --index-url https://...".
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
fi
echo "[setup] installing the project and its test tools"
# The filter only hides pip's noise about absent local package folders; with pipefail a failed install
# still fails set-up (grep's own status is neutralised: no remaining lines is fine).
.venv/bin/python -m pip install -q -e '.[test]' 2>&1 | { grep -v "is neither a file nor a directory" || true; }
.venv/bin/python -c "import pix2pix, torch; print(f'[setup] ok: torch {torch.__version__}')"
