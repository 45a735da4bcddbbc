#!/usr/bin/env bash
# Fill .whl/ with the wheels bench/gpu_check_command.sh installs on the device machine, run here (where a
# package index is reachable) from the repository root:  bash bench/gpu_wheels.sh
# The device machine (Python 3.12, x86-64, no index) has torch, numpy, opencv, scipy, PyYAML, pyarrow,
# h5py, pytest, scikit-learn and matplotlib, but not albumentations, which the data sections' loader
# imports: these are albumentations and its dependencies missing there, nothing else, since a copy of a
# package the machine has would shadow its own (numpy, opencv, scipy, PyYAML, torch: never here).
# typing_extensions is there but too old for pydantic 2.14, so it comes too (newer is backward compatible).
# Versions: those in .venv (what the CPU suite runs against); a mismatch with .venv is reported, not fixed.
# .whl/ is ignored by git (.gitignore), so the device call must carry it: carry=[".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."

PINS=(
  albumentations==2.0.8
  albucore==0.0.24
  pydantic==2.14.4
  pydantic_core==2.50.5
  typing_extensions==4.16.0
  annotated_types==0.8.0
  typing_inspection==0.4.5
  stringzilla==5.3.2
  simsimd==6.5.16
)
PIP=(python3 -m pip)
if [[ -x .venv/bin/python ]]; then
  PIP=(.venv/bin/python -m pip)
  # The pins against .venv: the GPU run should import what the CPU suite tested.
  .venv/bin/python - "${PINS[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

for pin in sys.argv[1:]:
    name, wanted = pin.split("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        have = None
    if have != wanted:
        print(f"gpu_wheels: warning: {name} is {have} in .venv, pinned {wanted} here", file=sys.stderr)
EOF
fi

# One version of each package, or the install there stops: start from an empty set of wheels.
mkdir -p .whl
rm -f .whl/*.whl
# cp312 manylinux x86-64 wheels; pip matches each manylinux_2_N tag exactly, hence the list.
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_5_x86_64; do
  PLATFORMS+=(--platform "$tag")
done
"${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d .whl "${PINS[@]}"

count=$(find .whl -maxdepth 1 -type f -name '*.whl' | wc -l)
if [[ "$count" -ne "${#PINS[@]}" ]]; then
  echo "gpu_wheels: expected ${#PINS[@]} wheels in .whl, found $count" >&2
  exit 1
fi
ls -l .whl/*.whl | awk '{printf "%9d  %s\n", $5, $NF}'
du -cb .whl/*.whl | tail -1 |
  awk '{printf "total %.1f MiB in .whl (a device call carries at most 64 MiB in all)\n", $1 / 2^20}'
