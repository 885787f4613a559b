#!/usr/bin/env bash
# Qwen3-1.7B, seq 4096, bf16 on one GPU: try a few single-device configurations (micro batch, recompute,
# compile) with benchmarks/train_throughput.py at the same samples per optimizer step, profile one more
# step of each, and report each (tokens/s, MFU, where the step's GPU time goes) and the best.
# About 1.5 minutes per configuration on an H100/H200 (compile dominates), 5 with the defaults. Run from
# anywhere; needs only python3 + torch (+ transformers for the HF reference), not an installed package.
#
#   bash benchmarks/gpu_1p7b.sh            # GPU (or NPU): qwen3-1.7b
#   BENCH_CPU=1 bash benchmarks/gpu_1p7b.sh   # the same script on CPU with qwen3-tiny (end-to-end check)
#
# Environment: OUT (results folder, default ./bench_out), PYTHON (default python3),
#   CONFIGS  space-separated MICRO_BATCH:RECOMPUTE:COMPILE[:ATTENTION] with RECOMPUTE none|full|selective,
#            COMPILE eager|compile and ATTENTION an --attention-backend (default auto: torch's SDPA order)
#            (default "1:none:compile 2:none:compile 2:none:compile:fused": micro batch 4 without recompute
#            needs about 81 GiB by the planner, over an H100's 80 GB; add 4:none:compile on an H200),
#   SAMPLES_PER_STEP  samples per optimizer step, the same for every configuration (each runs
#            SAMPLES_PER_STEP / MICRO_BATCH micro batches per step; every micro batch must divide it);
#            default 8: the 1.7B recipe's global batch 64 over 8 devices (2 with BENCH_CPU=1),
#   ITERS / WARMUP (timed / untimed optimizer steps per configuration, default 4 / 2),
#   WITH_HF=1 (default) also runs HF transformers on the first configuration as a reference,
#   PROFILE=1 (default) profiles one more step of each configuration (not timed): the op table goes to
#            $OUT/profile_config_N/, the shares of matmul / attention / optimizer / other time to the summary,
#   CONFIG_TIMEOUT seconds per configuration (default 200).
# Writes $OUT/config_N.json (one per configuration), $OUT/summary.json and $OUT/gpu_1p7b.log.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-./bench_out}"
PYTHON="${PYTHON:-python3}"

if [[ "${BENCH_CPU:-0}" == "1" ]]; then
  export QWEN3_PRETRAIN_DEVICE=cpu
  MODEL=qwen3-tiny SEQ=64 MATMUL=256
  CONFIGS="${CONFIGS:-1:none:eager 2:full:eager 2:selective:eager}"
  ITERS="${ITERS:-2}" WARMUP="${WARMUP:-1}" SAMPLES_PER_STEP="${SAMPLES_PER_STEP:-2}"
else
  MODEL=qwen3-1.7b SEQ=4096 MATMUL=8192
  CONFIGS="${CONFIGS:-1:none:compile 2:none:compile 2:none:compile:fused}"
  ITERS="${ITERS:-4}" WARMUP="${WARMUP:-2}" SAMPLES_PER_STEP="${SAMPLES_PER_STEP:-8}"
fi
WITH_HF="${WITH_HF:-1}"
PROFILE="${PROFILE:-1}"
CONFIG_TIMEOUT="${CONFIG_TIMEOUT:-200}"

fail() { echo "gpu_1p7b.sh: $*" >&2; exit 2; }

# parse_config SPEC: check one CONFIGS entry; sets mbs, recompute, mode, attention and flags (its benchmark flags).
parse_config() {
  IFS=: read -r mbs recompute mode attention <<<"$1"
  attention="${attention:-auto}"
  [[ "$mbs" =~ ^[1-9][0-9]*$ ]] || fail "CONFIGS entry $1: the micro batch must be a positive integer"
  ((SAMPLES_PER_STEP % mbs == 0)) \
    || fail "CONFIGS entry $1: micro batch $mbs does not divide SAMPLES_PER_STEP=$SAMPLES_PER_STEP"
  flags=(--micro-batch-size "$mbs" --accumulation "$((SAMPLES_PER_STEP / mbs))")
  case "$recompute" in
    none) ;;
    full | selective) flags+=(--recompute "$recompute") ;;
    *) fail "CONFIGS entry $1: recompute must be none, full or selective" ;;
  esac
  case "$mode" in
    eager) ;;
    compile) flags+=(--compile) ;;
    *) fail "CONFIGS entry $1: the third field must be eager or compile" ;;
  esac
  case "$attention" in
    auto | flash | fused | efficient | unfused) flags+=(--attention-backend "$attention") ;;
    *) fail "CONFIGS entry $1: the fourth field must be auto, flash, fused, efficient or unfused" ;;
  esac
}

[[ "$SAMPLES_PER_STEP" =~ ^[1-9][0-9]*$ ]] \
  || fail "SAMPLES_PER_STEP must be a positive integer, got '$SAMPLES_PER_STEP'"
for spec in $CONFIGS; do
  parse_config "$spec"  # every entry before the first run
done

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee -a "$OUT/gpu_1p7b.log") 2>&1

echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) $MODEL seq $SEQ bf16, $SAMPLES_PER_STEP samples per step;" \
  "configurations: $CONFIGS; results in $OUT"
rm -rf "$OUT"/config_*.json "$OUT"/profile_config_*
index=0
for spec in $CONFIGS; do
  parse_config "$spec"
  index=$((index + 1))
  flags+=(--model "$MODEL" --seq-length "$SEQ" --iters "$ITERS" --warmup "$WARMUP" --dtype bf16
          --matmul-size "$MATMUL" --json "$OUT/config_$index.json")
  if [[ "$WITH_HF" != "1" || "$index" -gt 1 ]]; then
    flags+=(--skip-hf)
  fi
  if [[ "$PROFILE" == "1" ]]; then
    flags+=(--profile "$OUT/profile_config_$index")
  fi
  echo "== configuration $index: micro batch $mbs x $((SAMPLES_PER_STEP / mbs)) per step, recompute $recompute, $mode, attention $attention"
  timeout "$CONFIG_TIMEOUT" "$PYTHON" "$ROOT/benchmarks/train_throughput.py" "${flags[@]}" \
    || echo "== configuration $index ($spec) failed or timed out (exit $?)"
done

"$PYTHON" - "$OUT" "$SAMPLES_PER_STEP" $CONFIGS <<'EOF'
"""Table of every configuration (throughput and, where profiled, the shares of the step's time) and the
best one; $OUT/summary.json."""
import json
import os
import sys
from pathlib import Path

out, samples_per_step, specs = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
CATEGORIES = ("matmul", "attention", "optimizer", "other")


def shares(r):
    """The profile's shares by category and its time over the timed step, as table cells."""
    profile = r.get("profile")
    if not profile or "error" in profile:
        return " ".join(f"{'-':>7}" for _ in (*CATEGORIES, "busy"))
    values = [profile["shares"][c] for c in CATEGORIES] + [profile["of_timed_step"]]
    return " ".join(f"{100 * v:6.1f}%" for v in values)


rows = []
for index, spec in enumerate(specs, start=1):
    path = out / f"config_{index}.json"
    report = json.loads(path.read_text()) if path.is_file() else None
    ours = next((r for r in report["results"] if r["impl"] == "ours"), None) if report else None
    hf = next((r for r in report["results"] if r["impl"] == "hf"), None) if report else None
    rows.append({"config": spec, "accumulation": samples_per_step // int(spec.split(":")[0]), "ours": ours,
                 "hf": hf, "report": path.name if report else None, "machine": report["machine"] if report else None})
print(f"\n{samples_per_step} samples per optimizer step (micro batch x accum). matmul .. other: shares of one\n"
      "profiled step's self time (GPU kernels; CPU ops on CPU and NPU); busy: that time / the timed step's time")
print(f"{'configuration':<22} {'accum':>5} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'MFU spec':>8} "
      f"{'peak mem GB':>11} {'matmul':>7} {'attn':>7} {'optim':>7} {'other':>7} {'busy':>7}")
for row in rows:
    for impl in ("ours", "hf"):
        r = row[impl]
        if r is None or "error" in r:
            if impl == "ours":
                print(f"{row['config']:<22} failed: {r['error'] if r else 'no result (see the log above)'}")
            continue
        spec = f"{100 * r['mfu_spec']:7.1f}%" if r.get("mfu_spec") is not None else f"{'-':>8}"
        name = row["config"] + (" (HF)" if impl == "hf" else "")
        print(f"{name:<22} {row['accumulation']:5d} {r['tokens_per_s']:10.1f} {r['tflops']:8.2f} "
              f"{100 * r['mfu']:5.1f}% {spec} {r['peak_memory_gb']:11.2f} {shares(r)}")
        if "error" in r.get("profile", {}):
            print(f"{'':<22} profile failed: {r['profile']['error']}")
ok = [row for row in rows if row["ours"] is not None and "error" not in row["ours"]]
best = max(ok, key=lambda row: row["ours"]["tokens_per_s"]) if ok else None
if best:
    r = best["ours"]
    spec = f", MFU {100 * r['mfu_spec']:.1f}% of the datasheet peak" if r.get("mfu_spec") is not None else ""
    print(f"\nBEST {best['config']} (micro batch:recompute:compile[:attention]): {r['tokens_per_s']:.1f} tokens/s, "
          f"{r['tflops']:.2f} TFLOP/s, MFU {100 * r['mfu']:.1f}% of the measured bf16 matmul peak{spec}")
summary = {"samples_per_step": samples_per_step, "configs": rows, "best": best["config"] if best else None}
tmp = out / "summary.json.tmp"
tmp.write_text(json.dumps(summary, indent=1) + "\n")
os.replace(tmp, out / "summary.json")
sys.exit(0 if best else 1)
EOF
