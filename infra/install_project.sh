#!/usr/bin/env bash
# Installs this project into the current Python environment of a Ray image without replacing its ray or
# torch. Used by infra/Dockerfile (image build) and by ray_cluster.yaml's setup_commands (each node).
#
#   bash infra/install_project.sh SRC                   # SRC: pyproject.toml, README.md and the packages
#   P2P_DEPS_ONLY=1 bash infra/install_project.sh SRC   # only the dependencies (a cacheable image layer)
#
# 1. torch: kept as it is when importable. The rayproject/ray images ship no torch, so then TORCH_SPEC is
#    installed (default torch==2.13.0 from PyPI, whose Linux wheels bring their own CUDA runtime and need
#    only the host's NVIDIA driver). TORCH_SPEC may name another build, with pip options:
#    TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
# 2. The installed ray and torch versions become pip constraints (ray==X, torch==Y+cuZ), so resolving the
#    project's dependencies can never upgrade, downgrade or swap the image's builds: a conflict fails loudly.
# 3. The project is installed from a copy of SRC (SRC may be read-only or root-owned, e.g. a bind mount).
set -euo pipefail

SRC=${1:?usage: install_project.sh SRC}
PY=${PYTHON:-python}
PIP=("$PY" -m pip install --no-cache-dir --disable-pip-version-check)

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[install] no torch in this environment: installing ${TORCH_SPEC:-torch==2.13.0}"
  # shellcheck disable=SC2086  # TORCH_SPEC may carry pip options (--index-url ...)
  "${PIP[@]}" ${TORCH_SPEC:-torch==2.13.0}
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" - >"$work/constraints.txt" <<'EOF'
from importlib.metadata import version

for dist in ("ray", "torch"):
    print(f"{dist}=={version(dist)}")
EOF
echo "[install] keeping $(tr '\n' ' ' <"$work/constraints.txt")"

if [ -n "${P2P_DEPS_ONLY:-}" ]; then
  "$PY" - "$SRC/pyproject.toml" >"$work/requirements.txt" <<'EOF'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
EOF
  "${PIP[@]}" -c "$work/constraints.txt" -r "$work/requirements.txt"
  exit 0
fi

mkdir "$work/src"
cp -r "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/pix2pix" "$SRC/pipelines" "$SRC/bench" "$work/src/"
"${PIP[@]}" -c "$work/constraints.txt" "$work/src"
"$PY" -c "import pipelines, pix2pix, ray, torch
print(f'[install] ok: ray {ray.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda}), '
      f'GPUs visible here: {torch.cuda.device_count()}')"
