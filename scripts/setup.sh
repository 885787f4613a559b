#!/usr/bin/env bash
# Create .venv and install qwen3-pretrain with its test extras, CPU torch first.
# Usage: bash scripts/setup.sh   (re-running is cheap: pip skips what is installed)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# Torch first and explicitly: a bare `torch` requirement can pull a multi-GB CUDA build.
# On a GPU/NPU machine install the torch build for it before running this script.
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install -q "torch==${TORCH_VERSION:-2.13.0}"
$PIP install -q -e ".[test]"
# The offline Qwen BPE ranks ship inside dashscope; its own dependencies are not needed.
$PIP install -q --no-deps dashscope
echo "setup done: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
