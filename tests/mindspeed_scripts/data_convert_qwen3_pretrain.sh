#!/bin/bash
# The structure and flags of MindSpeed-LLM's examples/mcore/qwen3/data_convert_qwen3_pretrain.sh:
# `python ./preprocess_data.py` is replaced by `$QWEN3_PRETRAIN preprocess`. Paths come from the environment.
set -euo pipefail
QWEN3_PRETRAIN="${QWEN3_PRETRAIN:-qwen3-pretrain}"
mkdir -p "$DATASET_DIR"
$QWEN3_PRETRAIN preprocess \
    --input "$INPUT_PARQUET" \
    --tokenizer-name-or-path "$TOKENIZER_PATH" \
    --tokenizer-type PretrainedFromHF \
    --handler-name GeneralPretrainHandler \
    --output-prefix "$DATASET_DIR/enwiki" \
    --json-keys text \
    --workers 4 \
    --log-interval 1000
