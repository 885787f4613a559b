#!/usr/bin/env bash
# Qwen3-1.7B, seq 4096, bf16 on one GPU: try a few single-device configurations (micro batch, recompute,
# compile) with benchmarks/train_throughput.py, report each, then the best (tokens/s and MFU).
# About 2-3 minutes on an H100/H200 (compile dominates). Run from anywhere; needs only python3 + torch
# (+ transformers for the HF reference), not an installed package.
#
#   bash benchmarks/gpu_1p7b.sh            # GPU (or NPU): qwen3-1.7b
#   BENCH_CPU=1 bash benchmarks/gpu_1p7b.sh   # the same script on CPU with qwen3-tiny (end-to-end check)
#
# Environment: OUT (results folder, default ./bench_out), PYTHON (default python3),
#   CONFIGS  space-separated MICRO_BATCH:RECOMPUTE:COMPILE with RECOMPUTE none|full|selective and
#            COMPILE eager|compile (default "1:none:eager 1:none:compile 2:none:compile"),
#   ACCUM    micro batches per optimizer step (default 8: the recipe's global batch 64 over 8 devices at
#            micro batch 1 gives each device 8 micro batches per step),
#   ITERS / WARMUP (timed / untimed optimizer steps per configuration, default 4 / 2),
#   WITH_HF=1 (default) also runs HF transformers on the first configuration as a reference,
#   CONFIG_TIMEOUT seconds per configuration (default 300).
# Writes $OUT/config_N.json (one per configuration), $OUT/summary.json and $OUT/gpu_1p7b.log.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-./bench_out}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee -a "$OUT/gpu_1p7b.log") 2>&1

if [[ "${BENCH_CPU:-0}" == "1" ]]; then
  export QWEN3_PRETRAIN_DEVICE=cpu
  MODEL=qwen3-tiny SEQ=64 MATMUL=256
  CONFIGS="${CONFIGS:-1:none:eager 2:full:eager 2:selective:eager}"
  ITERS="${ITERS:-2}" WARMUP="${WARMUP:-1}" ACCUM="${ACCUM:-2}"
else
  MODEL=qwen3-1.7b SEQ=4096 MATMUL=8192
  CONFIGS="${CONFIGS:-1:none:eager 1:none:compile 2:none:compile}"
  ITERS="${ITERS:-4}" WARMUP="${WARMUP:-2}" ACCUM="${ACCUM:-8}"
fi
WITH_HF="${WITH_HF:-1}"
CONFIG_TIMEOUT="${CONFIG_TIMEOUT:-300}"

echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) $MODEL seq $SEQ bf16, $ACCUM micro batches per step; configurations: $CONFIGS; results in $OUT"
rm -f "$OUT"/config_*.json
index=0
for spec in $CONFIGS; do
  IFS=: read -r mbs recompute mode <<<"$spec"
  index=$((index + 1))
  flags=(--model "$MODEL" --seq-length "$SEQ" --micro-batch-size "$mbs" --accumulation "$ACCUM" --iters "$ITERS" --warmup "$WARMUP"
         --dtype bf16 --matmul-size "$MATMUL" --json "$OUT/config_$index.json")
  case "$recompute" in
    none) ;;
    full | selective) flags+=(--recompute "$recompute") ;;
    *) echo "CONFIGS entry $spec: recompute must be none, full or selective" >&2; exit 2 ;;
  esac
  case "$mode" in
    eager) ;;
    compile) flags+=(--compile) ;;
    *) echo "CONFIGS entry $spec: the third field must be eager or compile" >&2; exit 2 ;;
  esac
  if [[ "$WITH_HF" != "1" || "$index" -gt 1 ]]; then
    flags+=(--skip-hf)
  fi
  echo "== configuration $index: micro batch $mbs, recompute $recompute, $mode"
  timeout "$CONFIG_TIMEOUT" "$PYTHON" "$ROOT/benchmarks/train_throughput.py" "${flags[@]}" \
    || echo "== configuration $index ($spec) failed or timed out (exit $?)"
done

"$PYTHON" - "$OUT" $CONFIGS <<'EOF'
"""Table of every configuration and the best one; $OUT/summary.json."""
import json
import os
import sys
from pathlib import Path

out, specs = Path(sys.argv[1]), sys.argv[2:]
rows = []
for index, spec in enumerate(specs, start=1):
    path = out / f"config_{index}.json"
    report = json.loads(path.read_text()) if path.is_file() else None
    ours = next((r for r in report["results"] if r["impl"] == "ours"), None) if report else None
    hf = next((r for r in report["results"] if r["impl"] == "hf"), None) if report else None
    rows.append({"config": spec, "ours": ours, "hf": hf, "report": path.name if report else None,
                 "machine": report["machine"] if report else None})
print(f"\n{'configuration':<22} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'MFU spec':>8} {'peak mem GB':>11}")
for row in rows:
    for impl in ("ours", "hf"):
        r = row[impl]
        if r is None or "error" in r:
            if impl == "ours":
                print(f"{row['config']:<22} failed: {r['error'] if r else 'no result (see the log above)'}")
            continue
        spec = f"{100 * r['mfu_spec']:7.1f}%" if r.get("mfu_spec") is not None else f"{'-':>8}"
        name = row["config"] + (" (HF)" if impl == "hf" else "")
        print(f"{name:<22} {r['tokens_per_s']:10.1f} {r['tflops']:8.2f} {100 * r['mfu']:5.1f}% {spec} "
              f"{r['peak_memory_gb']:11.2f}")
ok = [row for row in rows if row["ours"] is not None and "error" not in row["ours"]]
best = max(ok, key=lambda row: row["ours"]["tokens_per_s"]) if ok else None
if best:
    r = best["ours"]
    spec = f", MFU {100 * r['mfu_spec']:.1f}% of the datasheet peak" if r.get("mfu_spec") is not None else ""
    print(f"\nBEST {best['config']} (micro batch:recompute:compile): {r['tokens_per_s']:.1f} tokens/s, "
          f"{r['tflops']:.2f} TFLOP/s, MFU {100 * r['mfu']:.1f}% of the measured bf16 matmul peak{spec}")
summary = {"configs": rows, "best": best["config"] if best else None}
tmp = out / "summary.json.tmp"
tmp.write_text(json.dumps(summary, indent=1) + "\n")
os.replace(tmp, out / "summary.json")
sys.exit(0 if best else 1)
EOF
