#!/usr/bin/env bash
# Download the wheels that gpu_1p7b.sh's FP8 and torchtitan runs need and the lent GPU machine lacks (it has
# Python 3.12, torch, triton, pandas, pyarrow, huggingface-hub, ... and no network): torchao for --fp8-format,
# torchtitan 0.3.0 with the packages its import needs (installed there with --no-deps: its declared
# requirements would pull more). Run here, then carry the folder (see BENCHMARKS.md for the command).
#
#   bash benchmarks/device_wheels.sh [DEST]   # default DEST: .whl (ignore it in .git/info/exclude)
set -euo pipefail

DEST="${1:-.whl}"
PYTHON="${PYTHON:-python3}"
PACKAGES=(torchao==0.18.0 torchtitan==0.3.0 tyro==1.0.17 docstring_parser==0.18.0 typeguard==4.6.1
          spmd_types==0.2.3 torchdata==0.11.0 datasets==4.7.0 multiprocess==0.70.18 dill==0.4.0)

platforms=()
for n in 28 27 24 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 --platform any -d "$DEST" "${PACKAGES[@]}"
du -sh "$DEST"
