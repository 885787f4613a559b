#!/bin/bash
# The structure and flags of MindSpeed-LLM's examples/mcore/qwen3/ckpt_convert_qwen3_hf2mcore.sh:
# `python convert_ckpt_v2.py` is replaced by `$QWEN3_PRETRAIN convert`. Paths come from the environment.
set -euo pipefail
export CUDA_DEVICE_MAX_CONNECTIONS=1
QWEN3_PRETRAIN="${QWEN3_PRETRAIN:-qwen3-pretrain}"
$QWEN3_PRETRAIN convert \
    --load-model-type hf \
    --save-model-type mg \
    --target-tensor-parallel-size 1 \
    --target-pipeline-parallel-size 2 \
    --load-dir "$HF_DIR" \
    --save-dir "$MCORE_DIR" \
    --model-type-hf qwen3
