#!/bin/bash
# The structure and flags of MindSpeed-LLM's examples/mcore/qwen3/ckpt_convert_qwen3_mcore2hf.sh:
# `python convert_ckpt_v2.py` is replaced by `$QWEN3_PRETRAIN convert`. Paths come from the environment.
set -euo pipefail
export CUDA_DEVICE_MAX_CONNECTIONS=1
QWEN3_PRETRAIN="${QWEN3_PRETRAIN:-qwen3-pretrain}"
$QWEN3_PRETRAIN convert \
    --load-model-type mg \
    --save-model-type hf \
    --load-dir "$MCORE_DIR" \
    --save-dir "$HF_OUT_DIR" \
    --hf-cfg-dir "$HF_DIR" \
    --model-type-hf qwen3
