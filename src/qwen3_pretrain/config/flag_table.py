"""The treatment of every Megatron-LM and MindSpeed training flag that is not a field of the config schema.

A MindSpeed or Megatron script runs with only the program name changed, so each upstream flag has exactly one
treatment: the schema implements it (config.train), the launcher takes it (train.cli), it is accepted as a
switch with no effect on results here (`SPEED_ONLY`, listed in the startup summary), it is accepted when its
value describes Qwen3 (`QWEN3_FIXED`), or it is refused with a reason (`REFUSED`). tests/data/upstream_flags.tsv
holds the upstream names this table was checked against; docs/flags.md lists them all with their treatment.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

REASONS: dict[str, str] = {
    "fusion": "a fused-kernel switch: qwen3-pretrain picks its kernels itself, same math",
    "overlap": (
        "a communication-overlap or scheduling switch: torch FSDP2/DTensor overlap communication themselves; "
        "results are the same"
    ),
    "distopt": (
        "FSDP2 already shards weights, gradients and optimizer state (a superset of the distributed "
        "optimizer)"
    ),
    "memory": (
        "a memory-saving, offload or swap optimisation: no effect on results here (size a layout with "
        "`qwen3-pretrain plan`)"
    ),
    "ckptio": (
        "a checkpoint I/O performance switch: native checkpoints are DCP, written by every rank, loadable by "
        "any layout"
    ),
    "logging": (
        "a logging/diagnostics switch for output qwen3-pretrain writes its own way (log line, metrics.jsonl, "
        "TensorBoard)"
    ),
    "dataside": (
        "a preprocessing flag: `train` reads the preprocessed .bin/.idx (use it with `qwen3-pretrain "
        "preprocess`)"
    ),
    "always": "always on in qwen3-pretrain",
    "qwen3": "fixed by the Qwen3 architecture",
    "device": "qwen3-pretrain picks the device and its backend itself (npu: hccl, cuda: nccl, cpu: gloo)",
    "ascend": (
        "an Ascend (MindSpeed) performance switch: npu_fusion_attention and torch_npu's fused kernels run by "
        "themselves; same results"
    ),
    "debug": "a debugging/diagnostic switch of Megatron's runtime: no effect on training here",
    "moe": (
        "a mixture-of-experts feature Qwen3-MoE does not have (shared experts, expert bias, grouped or hashed routing, "
        "DeepSeek's extra losses, upcycling, ...) or a MoE runtime option qwen3-pretrain does not implement"
    ),
    "dropless": (
        "Qwen3-MoE is dropless: every token reaches its top-k experts (no capacity factor, padding or token "
        "dropping)"
    ),
    "shared": "Qwen3-MoE has no shared experts (every MoE MLP is the routed experts only)",
    "moerecipe": (
        "not part of Qwen3-MoE's training (router z-loss, input jitter, expert score scaling): not implemented"
    ),
    "moespeed": (
        "a MoE kernel or communication-overlap switch: experts always run as one grouped computation and tokens "
        "move by all-to-all (dropless), so results are the same"
    ),
    "moedtype": (
        "the router runs its matmul in the compute dtype and its softmax/top-k in float32 (HF Qwen3-MoE's "
        "numerics); another router or dispatch dtype is not implemented"
    ),
    "cp": (
        "a context-parallel variant or tuning switch of MindSpeed's (hybrid / adaptive CP, Ulysses degree, KV "
        "caching) that is not implemented; use --context-parallel-algo megatron_cp_algo or ulysses_cp_algo"
    ),
    "fp8": (
        "an FP8/FP4 or quantisation option that is not implemented: FP8 here is --fp8-format with --fp8-recipe "
        "tensorwise or rowwise (current scaling of the block linears; no amax history, FP4, FP8 parameters or "
        "layer exceptions)"
    ),
    "arch": (
        "configures an architecture other than dense Qwen3 (RMSNorm, RoPE theta, SwiGLU, GQA, q/k RMSNorm, no"
        " biases)"
    ),
    "infer": (
        "an inference/generation/evaluation option: qwen3-pretrain trains; export with `qwen3-pretrain "
        "export` for inference"
    ),
    "post": "post-training (RL, DPO, SFT, distillation, LoRA, QAT): not a pretraining option of qwen3-pretrain",
    "vision": "a vision/retrieval/BERT/T5 model option: qwen3-pretrain trains Qwen3 text models",
    "infra": (
        "a cluster-infrastructure integration (fault tolerance, straggler detection, elastic training, "
        "telemetry, in-process restart) qwen3-pretrain does not have"
    ),
    "distckpt": (
        "a Megatron distributed-checkpoint option: native checkpoints are DCP; convert mcore checkpoints with"
        " `qwen3-pretrain convert`"
    ),
    "fsdp": (
        "a Megatron/MindSpeed FSDP or ZeRO variant: qwen3-pretrain uses torch FSDP2 (or --no-shard for "
        "replicated data parallel)"
    ),
    "optim": (
        "an optimizer other than AdamW (Megatron's `adam`), or a change to its numerics, which qwen3-pretrain"
        " does not implement"
    ),
    "tok": (
        "a tokenizer other than the HF tokenizer: use --tokenizer-type PretrainedFromHF with --tokenizer-"
        "name-or-path"
    ),
    "rope": (
        "RoPE scaling/variants (YaRN, LongRoPE, ...): Qwen3 base pretraining uses plain RoPE with --rotary-"
        "base"
    ),
    "data": (
        "a Megatron data-pipeline option qwen3-pretrain does not implement (GPT samples from --data-path / "
        "--split)"
    ),
    "sched": (
        "a schedule feature qwen3-pretrain does not implement (Megatron's OptimizerParamScheduler with a "
        "constant weight decay)"
    ),
    "pp": "a pipeline-layout option qwen3-pretrain does not implement: use --num-layer-list for uneven stages",
    "train": "a Megatron training-loop feature qwen3-pretrain does not implement",
    "convert": "a checkpoint-conversion option: use `qwen3-pretrain convert` (MindSpeed's convert_ckpt.py flags)",
    "tool": "an option of another MindSpeed tool, not of pretraining",
    "ascendfeat": "a MindSpeed feature qwen3-pretrain does not implement",
    "nonfinite": (
        "non-finite iterations are always detected, skipped and counted here (--stop-after-nonfinite-iters "
        "ends a run of them)"
    ),
    "spec": "the layer spec: qwen3-pretrain always builds the Qwen3 decoder layer",
    "legacy": "Megatron's legacy GPT model: qwen3-pretrain builds the Qwen3 model that mcore's local spec describes",
    "qwen3fixed": "accepted when its value describes Qwen3",
    "profiler": (
        "a choice of profiler or an option of torch_npu's or nsys's: --profile always runs torch.profiler here "
        "(its detail set by --profile-with-cpu/-stack/-memory and --profile-record-shapes)"
    ),
    "chakra": "Chakra execution traces are not written; --profile writes a Chrome/Perfetto trace",
}

# Accepted with no effect on results, by reason. `--flag` takes no value, `--flag V` one, `--flag V V` two,
# `--flag V...` one or more.
SPEED_ONLY: dict[str, tuple[str, ...]] = {
    "fusion": (
        "--use-flash-attn", "--use-fused-rmsnorm", "--use-fused-swiglu", "--use-fused-rotary-pos-emb",
        "--no-masked-softmax-fusion", "--masked-softmax-fusion", "--no-gradient-accumulation-fusion",
        "--no-bias-dropout-fusion", "--no-bias-gelu-fusion", "--no-bias-swiglu-fusion", "--no-rope-fusion",
        "--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl V", "--fused-residual-rmsnorm",
        "--use-fused-weighted-squared-relu", "--disable-jit-fuser", "--no-persist-layer-norm", "--transformer-impl V",
        "--use-te-activation-func", "--use-transformer-engine-op-fuser", "--flash-attention-version V",
        "--gemm-gradient-accumulation-fusion", "--use-fusion-attn-v2", "--use-fused-moe-token-permute-and-unpermute",
        "--jit-compile", "--use-kitchen-attention", "--kitchen-attention-backend V", "--batch-invariant-backend V",
        "--use-fused-ring-attention-update", "--no-create-attention-mask-in-dataloader", "--attention-mask-on-cpu",
        "--use-nd-matmul", "--nd1-dim1-size V", "--nd2-dim1-size V", "--use-grouped-gemm-for-dense-mlp",
        "--no-gradient-reduce-div-fusion",
    ),
    "overlap": (
        "--overlap-grad-reduce", "--overlap-param-gather", "--no-async-tensor-model-parallel-allreduce V",
        "--use-cp-send-recv-overlap",
        "--tp-comm-overlap", "--tp-comm-overlap-rs-dgrad", "--disable-tp-comm-bulk-dgrad",
        "--disable-tp-comm-bulk-wgrad", "--disable-tp-comm-overlap-ag", "--disable-tp-comm-overlap-rs",
        "--disable-tp-comm-split-ag", "--disable-tp-comm-split-rs", "--no-tp-comm-bulk-dgrad",
        "--no-tp-comm-bulk-wgrad", "--no-tp-comm-overlap-ag", "--no-tp-comm-overlap-rs", "--no-tp-comm-split-ag",
        "--no-tp-comm-split-rs", "--tp-comm-bootstrap-backend V", "--tp-comm-overlap-cfg V",
        "--overlap-p2p-communication-warmup-flush", "--no-overlap-p2p-communication", "--use-ring-exchange-p2p",
        "--overlap-param-gather-with-optimizer-step", "--delay-wgrad-compute", "--defer-embedding-wgrad-compute",
        "--wgrad-deferral-limit V", "--ddp-bucket-size V", "--ddp-num-buckets V",
        "--ddp-pad-buckets-for-high-nccl-busbw", "--ddp-average-in-collective", "--disable-align-grad-reduce",
        "--no-align-grad-reduce", "--no-align-param-gather", "--high-priority-stream-groups V...", "--use-sharp",
        "--sharp-enabled-group V", "--use-nccl-ub", "--nccl-communicator-config-path V",
        "--disable-symmetric-registration", "--symmetric-ar-type V", "--create-all-gather-group",
        "--suggested-communication-unit-size V", "--use-mc2", "--use-ascend-mc2", "--use-ascend-coc",
        "--coc-fused-kernel", "--coc-mode V", "--coc-parallel-num V", "--enable-overlap-ag-with-matmul",
        "--enable-overlap-matmul-with-rs", "--enable-backward-overlap-ag-with-matmul", "--optimize-send-recv-comm",
        "--optimize-vpp-send-recv-comm", "--ampipe-tp-sp-comm-overlap", "--hccl-group-buffer V",
        "--hccl-group-buffer-adaptive", "--hccl-slice-size V", "--hccl-op-mode V", "--reset-bucket-group-order",
        "--param-and-grad-buffer-pad V", "--enable-cuda-graph", "--cuda-graph-impl V", "--cuda-graph-warmup-steps V",
        "--external-cuda-graph", "--cuda-graph-scope V...", "--cuda-graph-modules V...",
        "--delay-offload-until-cuda-graph", "--optimizer-cuda-graph", "--train-sync-interval V",
        "--enable-token-rearrange-opt", "--async-log-allreduce", "--pipeline-model-parallel-comm-backend V",
        "--torch-fsdp2-no-reshard-after-forward", "--no-use-rts",
    ),
    "distopt": (
        "--use-distributed-optimizer", "--num-distributed-optimizer-instances V", "--distributed-optimizer-no-replica",
        "--use-torch-fsdp2",
    ),
    "memory": (
        "--reuse-fp32-param", "--cpu-offloading-num-layers V", "--cpu-offloading-retain-pinned-cpu-buffers",
        "--fine-grained-activation-offloading", "--fine-grained-offloading-max-inflight-offloads V",
        "--min-offloaded-tensor-size V", "--offload-modules V...", "--activation-offload-fraction V",
        "--delta-offload-bytes-across-pp-ranks V", "--distribute-saved-activations", "--swap-attention",
        "--swap-modules V", "--smart-swap", "--swap-layer-input", "--adaptive-memory-optimization",
        "--adaptive-recompute-device-size V", "--adaptive-recompute-device-swap",
        "--adaptive-recompute-profiling-step V", "--save-memory-ratio V", "--empty-unused-memory-level V",
        "--no-pin-cpu-grads", "--no-pin-cpu-params", "--use-cpu-initialization", "--init-model-with-meta-device",
        "--no-clone-scatter-output-in-embedding", "--disable-clone-scatter-output-in-embedding", "--disable-gloo-group",
        "--disable-gloo-process-groups", "--enable-share-memory", "--manual-gc", "--manual-gc-interval V",
        "--disable-manual-gc-eval", "--no-manual-gc-eval", "--loss-chunk-size V", "--loss-compute-mode V",
        "--recompute-norm", "--recompute-norm-num-layers V", "--recompute-activation-function",
        "--recompute-activation-function-num-layers V", "--recompute-in-bubble", "--recompute-in-advance",
        "--enable-recompute-layers-per-pp-rank", "--keep-fp8-transpose-cache", "--mlp-chunks-for-training V",
        "--high-priority-a2a-comm-stream",
    ),
    "ckptio": (
        "--async-strategy V", "--async-ckpt-cpu-priority V", "--async-ckpt-io-priority V",
        "--async-ckpt-use-cpu-shm", "--ckpt-fully-parallel-save", "--no-ckpt-fully-parallel-save",
        "--ckpt-fully-parallel-load", "--ckpt-fully-parallel-load-exchange-algo V",
        "--ckpt-fully-parallel-load-per-rank-objects", "--ckpt-fully-parallel-load-process-group V",
        "--ckpt-fully-parallel-save-process-group V", "--ckpt-assume-constant-structure",
        "--use-persistent-ckpt-worker", "--ckpt-pg-tensors-cache-create", "--ckpt-pg-tensors-cache-path V",
        "--no-shared-storage", "--disable-ckpt-load-validate-sharding-integrity",
        "--no-ckpt-load-validate-sharding-integrity", "--ckpt-drop-redundant-extra-state",
    ),
    "logging": (
        "--log-throughput", "--log-timers-to-tensorboard", "--log-validation-ppl-to-tensorboard", "--log-params-norm",
        "--log-num-zeros-in-grad", "--log-world-size-to-tensorboard", "--log-progress", "--log-energy",
        "--log-max-attention-logit", "--log-device-memory-used", "--log-memory-interval V", "--logging-level V",
        "--log-level V", "--timing-log-level V", "--timing-log-option V", "--no-barrier-with-level-1-timing",
        "--tensorboard-queue-size V", "--disable-log-loss-scale-to-tensorboard", "--no-log-loss-scale-to-tensorboard",
        "--log-straggler", "--config-logger-dir V", "--op-cal-tflops", "--print-expert-load",
        "--moe-per-layer-logging", "--nvtx-ranges",
    ),
    "profiler": (
        "--use-pytorch-profiler", "--profile-level V", "--profile-export-type V", "--profile-data-simplification",
        "--record-shapes",
    ),
    "dataside": (
        "--handler-name V", "--workers V", "--append-eod", "--json-keys V...", "--output-prefix V", "--split-sentences",
        "--keep-newlines", "--tokenizer-not-use-fast", "--tokenizer-padding-side V", "--prompt-type V",
        "--prompt-type-path V", "--n-subs V", "--dataset-impl V", "--cache-dir V", "--input V", "--map-keys V",
        "--pack", "--streaming", "--overwrite-cache", "--hf-datasets-params V", "--num-dataset-builder-threads V",
        "--dataloader-defer-npy-index-mmap", "--dataloader-fast-cache-load", "--no-mmap-bin-files",
        "--object-storage-cache-path V", "--per-dataset-sequences-path V",
    ),
    "always": (
        "--attention-softmax-in-fp32", "--accumulate-allreduce-grads-in-fp32", "--exit-signal-handler", "--moe-no-drop",
        "--topk-softmax-in-fp32",
        "--exit-signal-handler-for-training", "--use-mcore-models", "--calculate-per-token-loss",
    ),
    "qwen3": (
        "--qk-layernorm", "--swiglu", "--disable-bias-linear", "--use-rotary-position-embeddings",
    ),
    "nonfinite": (
        "--no-check-for-nan-in-loss-and-grad",
    ),
    "moespeed": (
        "--moe-grouped-gemm", "--moe-permutation-async-comm", "--moe-permute-fusion", "--moe-router-fusion",
        "--moe-alltoall-overlap-comm", "--moe-allgather-overlap-comm", "--moe-use-grouped-tensor",
    ),
    "spec": (
        "--spec V...",
    ),
    "device": (
        "--distributed-backend V", "--local-rank V", "--npu-deterministic",
    ),
    "ascend": (
        "--use-nanopipe", "--use-nanopipe-swap", "--automated-pipeline", "--automated-pipeline-perf",
        "--optimization-level V", "--ampipe-degree V", "--use-multiparameter-pipeline-model-parallel",
        "--unaligned-linear", "--pp-schedule-list V", "--optimized-mbs-list V", "--optimized-mbs-mode", "--mbs-idx V",
        "--prof-file V", "--npu-datadump", "--megatron-cp-in-bnsd", "--shape-order V", "--pre-tockens V",
        "--next-tockens V", "--sparse-mode V",
    ),
    "debug": (
        "--flight-recorder-dump-path V", "--flight-recorder-include-stack-trace",
        "--flight-recorder-trace-buffer-size V", "--disable-flight-recorder-dump-on-timeout",
        "--disable-flight-recorder-extra-dump-on-exec", "--disable-flight-recorder-include-only-active",
        "--no-flight-recorder-dump-on-timeout", "--no-flight-recorder-extra-dump-on-exec",
        "--no-flight-recorder-include-only-active", "--run-workload-inspector-server", "--memory-snapshot-path V",
        "--record-memory-history", "--gpu-sniff-test-interval V", "--check-weight-hash-across-dp-replicas-interval V",
        "--dump-param-to-param-group-map V", "--fake-process-group", "--lazy-mpu-init", "--te-comparison-with-bf16",
        "--te-comparison-with-cpu",
    ),
}

# Accepted (no effect) when the value is one of these; the first is Qwen3's.
QWEN3_FIXED: dict[str, tuple[str, ...]] = {
    "--normalization": ("RMSNorm",),
    "--position-embedding-type": ("rope",),
    "--hidden-dropout": ("0", "0.0",),
    "--attention-dropout": ("0", "0.0",),
    "--rotary-percent": ("1", "1.0",),
    "--tokenizer-type": ("PretrainedFromHF", "HuggingFaceTokenizer",),
    "--attention-mask-type": ("causal",),
    "--moe-router-score-function": ("softmax",),
}

# Refused, by reason: the flags named, and every flag starting with an entry that ends with "-".
REFUSED: dict[str, tuple[str, ...]] = {
    "dropless": (
        "--moe-expert-capacity-factor", "--moe-expert-rank-capacity-factor", "--moe-pad-expert-input-to-capacity",
        "--moe-token-drop-policy", "--moe-train-capacity-factor", "--moe-dynamic-padding",
    ),
    "moerecipe": (
        "--moe-z-loss-coeff", "--moe-input-jitter-eps", "--moe-router-topk-scaling-factor",
        "--moe-apply-probs-on-input",
    ),
    "moedtype": (
        "--moe-router-dtype", "--moe-combine-bwd-dtype", "--moe-dispatch-fwd-dtype", "--moe-revert-type-after-topk",
    ),
    "shared": (
        "--moe-shared-expert-",
    ),
    "moe": (
        "--moe-deepep-", "--moe-enable-", "--moe-flex-", "--moe-hybridep-", "--moe-latent-size",
        "--moe-mlp-glu-interleave-size", "--moe-ncclep-", "--moe-pad-experts-for-cuda-graph-inference",
        "--moe-paged-stash", "--moe-paged-stash-", "--moe-permute-fusion-into-hybridep",
        "--moe-router-bias-update-rate",
        "--moe-router-enable-expert-bias", "--moe-router-force-", "--moe-router-group-topk", "--moe-router-num-groups",
        "--moe-router-padding-for-", "--moe-router-quantile-balancing-ema", "--moe-routing-trace-",
        "--moe-single-grouped-", "--moe-upcycling-granularity", "--moe-use-upcycling", "--moe-alltoall-mc2",
        "--moe-bmm-mc2", "--moe-comm-aux-loss-coeff", "--moe-device-level-aux-loss-coeff", "--moe-fb-overlap",
        "--moe-intermediate-size", "--moe-model-type", "--moe-unperm2-mem-optim-swap", "--moe-use-sinkhorn",
        "--moe-zero-memory", "--moe-zero-memory-num-layers", "--moe-adaptive-recompute-activation",
        "--moe-adaptive-recompute-activation-scale",
        "--expert-", "--n-shared-experts", "--shared-expert-", "--balanced-moe-",
        "--enable-expert-placement", "--enable-fine-grained-expert-placement", "--fine-grained-expert-placement-",
        "--trans-hot-expert-", "--noisy-gate-policy", "--fix-router", "--router-", "--seq-aux",
        "--num-zero-experts", "--n-hash-layers", "--use-pipe-experts", "--pipe-experts-",
        "--routed-scaling-factor", "--n-group", "--topk-group", "--overlap-moe-expert-parallel-comm",
        "--overlap-dispatch-backward-", "--ep-overlap-", "--use-grouped-gemm-for-shared-expert", "--hccl-ep-group-",
    ),
    "cp": (
        "--cp-", "--adaptive-cp-", "--hierarchical-context-parallel-", "--hybrid-context-parallel",
        "--ulysses-degree-in-cp", "--use-ulysses-allgather-kv", "--kv-head-repeat-before-uly-",
        "--context-parallel-cache-", "--context-parallel-kv-",
        "--max-seqlen-per-dp-cp-rank",
    ),
    "fp8": (
        "--fp8-", "--fp4-", "--first-last-layers-bf16", "--num-layers-at-", "--disable-fp8-", "--no-fp8-", "--qat-",
        "--quant-", "--te-precision-config-", "--reuse-grad-buf-for-mxfp8-", "--no-use-gmm-fp8", "--te-gmm-mode",
        "--o2-", "--indexer-qk-quant-",
    ),
    "infer": (
        "--inference-", "--no-inference-", "--num-speculative-tokens", "--output-bert-embeddings",
        "--use-legacy-static-engine", "--use-same-sampling-seed-across-dp-ranks", "--flash-decode",
        "--decode-only-cuda-graphs", "--enable-chunked-prefill", "--nccl-all-reduce-for-prefill",
        "--mlp-chunks-for-prefill", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--use-kv-cache",
        "--add-eos-token", "--hf-chat-template", "--history-turns", "--max-length", "--task", "--max-batch-size",
        "--cache-mla-latents", "--alternative-prompt", "--broadcast", "--chain-of-thought", "--eval-language",
        "--evaluation-batch-size", "--greedy", "--instruction-template", "--max-eval-samples", "--no-chat-template",
        "--origin-postprocess", "--task-data-path", "--bert-embedder-type",
    ),
    "post": (
        "--rl-", "--grpo-", "--no-rl-", "--langrl-", "--perform-rl-step", "--refit-method", "--dpo-", "--lora-",
        "--lu-lora-", "--save-lora-to-hf", "--sft", "--logits-", "--ref-model", "--refer-model-iter",
        "--is-pairwise-dataset", "--pref-ftx", "--qad-", "--no-qad-", "--kl-", "--is-instruction-dataset",
        "--variable-seq-lengths", "--no-pad-to-seq-lengths", "--cut-max-seqlen", "--no-cut-token",
        "--full-shuffle-instruction-dataset", "--freeze-all-layers", "--reward-tokens", "--drop-thinking",
        "--neat-pack", "--enable-thinking", "--dataset-additional-keys", "--reasoning-effort", "--stage",
    ),
    "legacy": (
        "--use-legacy-models",
    ),
    "vision": (
        "--dino-", "--img-", "--vision-", "--swin-", "--num-channels", "--num-classes", "--patch-dim",
        "--classes-fraction", "--data-per-class-fraction", "--head-lr-mult", "--iter-per-epoch", "--mask-factor",
        "--mask-type", "--no-data-sharding", "--bert-", "--biencoder-", "--block-data-path", "--embedding-path",
        "--evidence-data-path", "--ict-", "--indexer-batch-size", "--indexer-log-interval", "--query-in-block-prob",
        "--retriever-", "--titles-data-path", "--use-one-sent-docs", "--encoder-", "--decoder-num-layers",
        "--decoder-seq-length", "--mask-prob", "--short-seq-prob", "--relative-attention-", "--mrope-section",
    ),
    "infra": (
        "--inprocess-", "--fault-injector-", "--one-logger-", "--no-one-logger", "--app-tag-run-", "--straggler-",
        "--disable-straggler-", "--otel-", "--enable-ft-package", "--calc-ft-timeouts", "--ft-num-warmup-iters",
        "--adlr-autoresume", "--adlr-autoresume-", "--ttp-", "--enable-high-availability", "--enable-elastic-training",
        "--enable-hbmfault-repair", "--enable-worker-reboot", "--aiqos", "--aiqos-", "--enable-msc", "--disable-msc",
        "--rerun-mode", "--error-injection-", "--check-for-spiky-loss", "--result-rejected-tracker-filename",
        "--target-nnodes", "--distributed-timeout-seconds-after-init", "--auto-settings", "--auto-settings-",
    ),
    "distckpt": (
        "--dist-ckpt-", "--use-dist-ckpt", "--auto-detect-ckpt-format", "--ckpt-convert-", "--non-persistent-",
        "--persistent-save-interval", "--replication", "--replication-", "--use-checkpoint-args",
        "--use-mp-args-from-checkpoint-args", "--load-main-params-from-ckpt", "--distrib-optim-fully-reshardable-",
        "--disable-strict-fsdp-dtensor-load", "--no-strict-fsdp-dtensor-load", "--ckpt-step",
        "--override-ckpt-iteration", "--verify-integrity", "--save-retain-interval", "--no-save-optim", "--no-save-rng",
        "--disable-save-tokenizer-assets", "--no-save-tokenizer-assets",
        "--disable-use-tokenizer-model-from-checkpoint-args", "--no-use-tokenizer-model-from-checkpoint-args",
        "--load-checkpoint-loosely", "--pretrained-checkpoint", "--only-convert-last-checkpoint",
        "--save-layer-by-layer",
    ),
    "fsdp": (
        "--use-megatron-fsdp", "--megatron-fsdp-", "--data-parallel-sharding-strategy", "--outer-dp-sharding-strategy",
        "--enable-full-sharding-in-hsdp", "--fsdp-", "--enable-zero3", "--layerzero", "--layerzero-",
        "--ddp-reduce-scatter-with-fp32-", "--ddp-param-name-patterns-", "--gtp-",
        "--tensor-parallel-num-weight-shards", "--no-use-layer-wise-param-layout", "--fsdp2-config-path",
        "--dist-train", "--virtual-optimizer", "--use-tp-pp-dp-mapping", "--model-parallel-size",
    ),
    "optim": (
        "--muon-", "--lion-", "--sgd-momentum", "--optimizer-cpu-offload", "--optimizer-offload-fraction",
        "--overlap-cpu-optimizer-d2h-h2d", "--use-torch-optimizer-for-cpu-offload", "--use-precision-aware-optimizer",
        "--exp-avg-dtype", "--exp-avg-sq-dtype", "--main-grads-dtype", "--main-params-dtype", "--optimizer-selection",
        "--swap-optimizer", "--swap-optimizer-", "--compress-", "--use-ema", "--ema-decay", "--grad-reduce-in-bf16",
        "--apply-wd-to-qk-layernorm", "--decoupled-lr", "--decoupled-min-lr", "--no-weight-decay-cond-type",
        "--quant-states", "--quant-grads",
    ),
    "tok": (
        "--tokenizer-model", "--vocab-file", "--merge-file", "--vocab-size", "--vocab-extra-ids", "--tiktoken-",
        "--null-tokenizer-", "--tokenizer-sentencepiece-", "--no-tokenizer-sentencepiece-",
        "--disable-tokenizer-sentencepiece-", "--tokenizer-hf-", "--tokenizer-special-tokens", "--tokenizer-metadata",
        "--trust-remote-code", "--chat-template", "--use-gigatoken", "--sft-tokenizer-prompt-format",
        "--disable-pad-vocab-size", "--no-pad-vocab-size", "--pad-vocab-size-to",
    ),
    "rope": (
        "--yarn-", "--no-yarn-", "--rope-scaling-", "--use-rope-scaling", "--rotary-seq-len-interpolation-factor",
        "--rotary-scaling-factor", "--rope-type", "--rotary-interleaved", "--no-rope-freq", "--beta-fast",
        "--beta-slow", "--dynamic-factor", "--high-freq-factor", "--low-freq-factor", "--long-factor", "--long-mscale",
        "--longrope-freqs-type", "--original-max-position-embeddings", "--short-factor", "--short-mscale",
        "--use-glm-rope", "--rope-factor", "--rope-theta", "--mscale", "--mscale-", "--compress-rope-theta",
        "--apply-rope-no-in-complex", "--partial-rotary-factor", "--original-seq-len",
    ),
    "arch": (
        "--mtp-", "--dsa-", "--no-dsa-", "--disable-dsa-", "--mhc-", "--enable-mhc", "--enable-mhc-", "--hc-",
        "--use-fused-mhc", "--use-triton-mhc", "--mup-", "--use-mup", "--mamba-", "--disable-mamba-", "--linear-",
        "--gdp-", "--hybrid-", "--is-hybrid-model", "--heterogeneous-", "--multi-latent-attention",
        "--multi-head-latent-attention", "--mla-", "--enable-mla-", "--recompute-mla-", "--kv-lora-rank",
        "--q-lora-rank", "--qk-head-dim", "--qk-pos-emb-head-dim", "--qk-nope-head-dim", "--qk-rope-head-dim",
        "--v-head-dim", "--enable-dsa-indexer", "--index-", "--indexer-loss-coeff", "--use-fused-lightning-indexer",
        "--use-fused-lightning-indexer-", "--use-dsa-absorb", "--use-fused-sparse-flash-attention",
        "--use-sparse-flash-attn", "--no-use-sparse-c8-indexer", "--kv-compress", "--compress-ratios", "--o-groups",
        "--o-lora-rank", "--sliding-window", "--sliding-window-", "--interleave-sliding-window", "--window-size",
        "--window-attn-skip-freq", "--add-qkv-bias", "--add-bias-linear", "--add-dense-bias", "--add-output-layer-bias",
        "--apply-layernorm-1p", "--apply-query-key-layer-scaling", "--apply-residual-connection-post-layernorm",
        "--attention-output-gate", "--activation-func-clamp-value", "--glu-linear-offset", "--squared-relu",
        "--openai-gelu", "--quick-geglu", "--geglu", "--gelu-tanh", "--onnx-safe", "--no-position-embedding",
        "--softmax-type", "--qk-clip", "--qk-clip-", "--qk-l2-norm", "--experimental-attention-variant",
        "--linear-attention-freq", "--enable-experimental", "--fp32-residual-connection", "--embedding-init-method-std",
        "--init-method-xavier-uniform", "--add-rmsnorm-offset", "--attn-logit-softcapping", "--cla-share-factor",
        "--dim-model-base", "--embedding-multiplier-scale", "--fc-type", "--input-embeds-norm", "--input-jitter",
        "--input-layernorm-in-fp32", "--no-enable-linear-qkv", "--no-post-layer-norm", "--output-layer-slice-num",
        "--output-logit-softcapping", "--output-multiplier-scale", "--post-norm", "--query-pre-attn-scalar",
        "--rmsnorm-weight-in-fp32", "--scale-emb", "--share-kvstates", "--skip-bias-add", "--scale-depth", "--alibi-",
        "--fill-neg-inf", "--square-alibi-mask", "--use-moba-attn", "--moba-", "--full-attention-interval",
        "--use-global-aux-loss", "--use-triton-gdn", "--swiglu-limit", "--use-triton-swiglu-limit",
        "--init-norm-weight-in-fp32", "--scale-fmt", "--padded-base-length", "--router-gating-in-fp32", "--yaml-cfg",
        "--use-deter-comp", "--deterministic-mode", "--batch-invariant-mode", "--enable-a2avc", "--enable-seq1f1b",
        "--seq1f1b-", "--fp16-lm-cross-entropy", "--output-logit-dtype", "--mamba-training-ssm-states-dtype",
        "--enable-mla-absorb", "--mrope-", "--fix-sub-seq-length",
    ),
    "pp": (
        "--decoder-first-pipeline-num-layers", "--decoder-last-pipeline-num-layers", "--pipeline-model-parallel-layout",
        "--account-for-embedding-in-pipeline-split", "--account-for-loss-in-pipeline-split",
        "--num-virtual-stages-per-pipeline-rank", "--microbatch-group-size-per-virtual-pipeline-stage",
        "--pipeline-num-transformer-layers", "--noop-layers", "--dualpipev-", "--schedules-method",
        "--layerwise-disaggregated-training",
    ),
    "sched": (
        "--start-weight-decay", "--end-weight-decay", "--weight-decay-incr-style", "--override-opt-param-scheduler",
        "--override-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler",
        "--use-checkpoint-opt_param-scheduler", "--warmup", "--rampup-batch-size", "--step-batch-size-schedule",
        "--decrease-batch-size-if-needed", "--phase-transition-iterations",
    ),
    "data": (
        "--fim-", "--dataloader-type", "--dataloader-inter-document-masking", "--encoder-seq-length",
        "--allow-ambiguous-pad-tokens", "--data-args-path", "--per-split-data-args-path", "--mid-level-dataset-surplus",
        "--sample-rate", "--multiple-validation-sets", "--validation-set-names", "--full-validation",
        "--eval-global-batch-size", "--eval-micro-batch-size", "--start-eval-at-iter", "--test-mode", "--skip-train",
        "--iterations-to-skip", "--no-shuffle", "--pad-to-multiple-of", "--padded-samples", "--datasets",
        "--dataset-dir", "--script-data-dir", "--interleave-probs", "--mix-strategy", "--merge-group-keys",
        "--max-samples",
    ),
    "train": (
        "--disable-bf16-reduced-precision-matmul", "--check-for-large-grads", "--batch-size",
        "--checkpoint-activations", "--recompute-activations", "--recompute-modules", "--recompute-module-list",
        "--recompute-type", "--moe-layer-recompute", "--gtp-remat", "--data-parallel-random-init",
        "--inference-rng-tracker", "--te-rng-tracker", "--no-initialization", "--exit-signal",
        "--exit-signal-handler-for-dataloader", "--save-activations-interval", "--save-dgrads-interval",
        "--save-params-interval", "--save-wgrads-interval", "--save-tokens-per-expert-interval", "--additional-config",
        "--max-tokens-to-oom",
    ),
    "convert": (
        "--enable-mg2hf-convert", "--hf-cfg-dir", "--hf-save-dir", "--mg-save-dir", "--load-model-type",
        "--save-model-type", "--loader", "--saver", "--max-queue-size", "--model-type", "--no-checking",
        "--ckpt-cfg-path", "--target-tensor-parallel-size", "--target-pipeline-parallel-size",
        "--target-expert-parallel-size", "--moe-tp-extend-ep", "--cvt-type", "--hf-dir", "--mg-dir",
        "--model-config-file", "--model-index-file", "--model-name", "--iteration", "--tp-2d", "--tp-x", "--tp-y",
        "--load-dir", "--save-dir", "--model-configs", "--shard-size", "--load-dir-cloud", "--load-dir-edge",
        "--merge-cloud-stages", "--merge-stages", "--middle-ranks", "--middle-stages", "--num-cloud-vpp-chunks",
        "--save-dir-cloud", "--save-dir-edge", "--split-cloud-rank", "--split-rank", "--ema_model", "--for_release",
        "--input_folder", "--output_folder", "--prefix", "--target_pp", "--target_tp", "--model-name-or-path",
    ),
    "tool": (
        "--patch", "--reverse", "--ai-framework", "--use-wandb", "--expert-interval",
    ),
    "chakra": (
        "--pytorch-profiler-collect-chakra",
    ),
    "ascendfeat": (
        "--use-ulysses", "--compress-dense", "--moe-adaptive", "--alibi-diagonal-opposite",
    ),
}

# Taken by `qwen3-pretrain train`'s launcher (train.cli) in torchrun's spellings; ignored under torchrun.
LAUNCHER_FLAGS: dict[str, str] = {
    "--nproc-per-node N": "processes on this machine (starts torchrun)",
    "--nnodes N": "machines in the job",
    "--node-rank R": "this machine's rank among them",
    "--master-addr ADDR": "address of the machine with node rank 0",
    "--master-port PORT": "free port on that machine",
    "--max-restarts N": "restart the workers this many times after a failure (torchrun)",
    "--rdzv-backend static|c10d": "rendezvous: static (node ranks as given; default) or c10d (torchrun's elastic one)",
}


LAUNCHER_FLAG_NAMES: tuple[str, ...] = tuple(usage.split()[0] for usage in LAUNCHER_FLAGS)


@dataclass(frozen=True)
class Treatment:
    """What `train` does with one upstream flag that is not a schema field."""

    kind: str  # "launcher" | "speed-only" | "qwen3-fixed" | "refused"
    reason: str
    values: int | str = 0  # values it takes: 0, 1, 2 or "+" (one or more)
    accepted: tuple[str, ...] = ()  # qwen3-fixed: the values that describe Qwen3


def _parse(entry: str) -> tuple[str, int | str]:
    """`--flag`, `--flag V`, `--flag V V`, `--flag V...` -> (flag, values)."""
    flag, *values = entry.split()
    return flag, "+" if values == ["V..."] else len(values)


@functools.cache
def _accepted() -> dict[str, Treatment]:
    table: dict[str, Treatment] = {}
    for key, entries in SPEED_ONLY.items():
        for flag, values in map(_parse, entries):
            table[flag] = Treatment("speed-only", REASONS[key], values)
    for flag, accepted in QWEN3_FIXED.items():
        table[flag] = Treatment("qwen3-fixed", f"{REASONS['qwen3fixed']} ({accepted[0]})", 1, accepted)
    for flag, what in zip(LAUNCHER_FLAG_NAMES, LAUNCHER_FLAGS.values(), strict=True):
        for spelling in (flag, flag.replace("-", "_").replace("__", "--")):
            table[spelling] = Treatment("launcher", what, 1)
    return table


def accepted_table_flags() -> list[str]:
    """The flags of the table that `train` accepts (speed-only, Qwen3-fixed, launcher)."""
    return list(_accepted())


def treatment(flag: str) -> Treatment | None:
    """The treatment of an upstream flag that is not a schema field; None for a flag nobody defines."""
    found = _accepted().get(flag)
    if found is not None:
        return found
    for key, entries in REFUSED.items():
        if any(flag == entry or (entry.endswith("-") and flag.startswith(entry)) for entry in entries):
            return Treatment("refused", REASONS[key])
    return None
