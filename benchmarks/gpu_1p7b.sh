#!/usr/bin/env bash
# Qwen3-1.7B, seq 4096 on one GPU: try a few bf16 single-device configurations (micro batch, recompute,
# compile) with benchmarks/train_throughput.py at the same samples per optimizer step, then, at the best one's
# settings, our FP8 runs (torchao float8, --fp8-format/--fp8-recipe) and torchtitan's own Qwen3 step
# (benchmarks/torchtitan_qwen3.py); profile one more step of each; measure the checkpoint-save stall; print
# each result (tokens/s, MFU, where the step's GPU time goes), the best bf16 configuration, and ours bf16 /
# ours fp8 / torchtitan side by side. About 1.2-1.5 minutes per run on an H100/H200 (compile dominates), under
# 8 minutes with the defaults (BUDGET_S). Run from anywhere; needs python3 + torch, torchao for FP8, torchtitan
# (the bench extra) for its side; not an installed package.
#
#   bash benchmarks/gpu_1p7b.sh            # GPU (or NPU): qwen3-1.7b
#   BENCH_CPU=1 bash benchmarks/gpu_1p7b.sh   # the same script on CPU with qwen3-tiny (end-to-end check)
#
# Environment: OUT (results folder, default ./bench_out), PYTHON (default python3),
#   CONFIGS  space-separated MICRO_BATCH:RECOMPUTE:COMPILE[:ATTENTION] with RECOMPUTE none|full|selective,
#            COMPILE eager|compile and ATTENTION an --attention-backend (default auto: torch's SDPA order)
#            (default "1:none:compile 2:none:compile:fused": micro batch 4 without recompute needs about
#            81 GiB by the planner, over an H100's 80 GB; add 4:none:compile on an H200),
#   SAMPLES_PER_STEP  samples per optimizer step, the same for every configuration (each runs
#            SAMPLES_PER_STEP / MICRO_BATCH micro batches per step; every micro batch must divide it);
#            default 8: the 1.7B recipe's global batch 64 over 8 devices (2 with BENCH_CPU=1),
#   ITERS / WARMUP (timed / untimed optimizer steps per configuration, default 4 / 2),
#   WITH_HF=1 also runs HF transformers on the first configuration as a reference (default 0),
#   FP8_RUNS  space-separated FORMAT:RECIPE (--fp8-format e4m3|hybrid, --fp8-recipe tensorwise|rowwise) run at
#            the best bf16 configuration (default "hybrid:tensorwise e4m3:rowwise", torchao's two recipes;
#            "none" skips them),
#   TORCHTITAN=1 (default) runs torchtitan's Qwen3 at the best bf16 configuration's micro batch, accumulation,
#            recompute and compile (skipped, with a note, where torchtitan does not import); TT_ATTENTION its
#            attention backend (default: flex on accelerators, sdpa on CPU),
#   PROFILE=1 (default) profiles one more step of each configuration (not timed): the op table goes to
#            $OUT/profile_config_N/, the shares of matmul / attention / optimizer / other time to the summary,
#   CONFIG_TIMEOUT seconds per run (default 200), BUDGET_S no run starts after this many seconds and each run's
#            timeout is cut to what is left (default 470 on accelerators, unlimited with BENCH_CPU=1),
#   SAVE_PRESET  the model of the checkpoint-save stall measurement (benchmarks/async_save.py: two saves,
#            synchronous vs --async-save, fp32 weights + AdamW state, seq 512); default qwen3-0.6b (10 GB per
#            save; qwen3-tiny with BENCH_CPU=1), "none" skips it; SAVE_TIMEOUT seconds for it (default 240).
#   LONG_SEQ  a long-context run: micro batch 1 at this sequence length with full recompute, compiled, one
#            device (context parallelism needs several; BENCHMARKS.md has the 8-device CP design); default 32768
#            (256 with BENCH_CPU=1), "none" skips it; it runs after the FP8 runs, within BUDGET_S,
#   MOE_LAYERS  a Qwen3-30B-A3B-shaped MoE run (128 experts, top-8, its real layer width) cut to this many
#            layers to fit one device, micro batch 1 at SEQ, compiled (qwen3-moe-bench with BENCH_CPU=1);
#            default 6 (about 70 GB of weights, gradients and AdamW state), "none" skips it; after LONG_SEQ,
#   PACK=1 (default) moves everything but summary.json and gpu_1p7b.log into $OUT/details.tar.gz at the end
#            (the device tool returns at most 8 files).
# Writes config_N.json (one per bf16 configuration), fp8_FORMAT_RECIPE.json, torchtitan.json, long_seq.json,
# moe.json, async_save.json,
# profile_*/ (packed), summary.json and gpu_1p7b.log to $OUT.
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
  CONFIGS="${CONFIGS:-1:none:compile 2:none:compile:fused}"
  ITERS="${ITERS:-4}" WARMUP="${WARMUP:-2}" SAMPLES_PER_STEP="${SAMPLES_PER_STEP:-8}"
fi
if [[ "${BENCH_CPU:-0}" == "1" ]]; then BUDGET_S="${BUDGET_S:-0}"; else BUDGET_S="${BUDGET_S:-470}"; fi
FP8_RUNS="${FP8_RUNS:-hybrid:tensorwise e4m3:rowwise}"
TORCHTITAN="${TORCHTITAN:-1}"
TT_ATTENTION="${TT_ATTENTION:-}"
PACK="${PACK:-1}"
if [[ "${BENCH_CPU:-0}" == "1" ]]; then MOE_MODEL=qwen3-moe-bench MOE_LAYERS="${MOE_LAYERS:-2}"; else MOE_MODEL=qwen3-30b-a3b MOE_LAYERS="${MOE_LAYERS:-6}"; fi
if [[ "${BENCH_CPU:-0}" == "1" ]]; then LONG_SEQ="${LONG_SEQ:-256}"; else LONG_SEQ="${LONG_SEQ:-32768}"; fi
if [[ "${BENCH_CPU:-0}" == "1" ]]; then SAVE_PRESET="${SAVE_PRESET:-qwen3-tiny}"; else SAVE_PRESET="${SAVE_PRESET:-qwen3-0.6b}"; fi
SAVE_TIMEOUT="${SAVE_TIMEOUT:-240}"
WITH_HF="${WITH_HF:-0}"
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

# limited SECONDS CMD...: run CMD with timeout SECONDS cut to what is left of BUDGET_S (0: no budget); when
# under 30 seconds are left it is skipped. Returns CMD's status (124 on timeout, 125 when skipped).
limited() {
  local limit="$1"
  shift
  if ((BUDGET_S > 0)); then
    local left=$((BUDGET_S - SECONDS))
    if ((left < 30)); then
      echo "== skipped: ${SECONDS}s of the ${BUDGET_S}s budget spent"
      return 125
    fi
    ((left < limit)) && limit=$left
  fi
  timeout "$limit" "$@"
}

# fp8_spec SPEC: check one FP8_RUNS entry FORMAT:RECIPE; sets fp8_format and fp8_recipe.
fp8_spec() {
  IFS=: read -r fp8_format fp8_recipe <<<"$1"
  [[ "$fp8_format" =~ ^(e4m3|hybrid)$ && "$fp8_recipe" =~ ^(tensorwise|rowwise)$ ]] \
    || fail "FP8_RUNS entry $1: use FORMAT:RECIPE with FORMAT e4m3|hybrid and RECIPE tensorwise|rowwise"
}

[[ "$SAMPLES_PER_STEP" =~ ^[1-9][0-9]*$ ]] \
  || fail "SAMPLES_PER_STEP must be a positive integer, got '$SAMPLES_PER_STEP'"
for spec in $CONFIGS; do
  parse_config "$spec"  # every entry before the first run
done
[[ "$FP8_RUNS" == "none" ]] && FP8_RUNS=""
for spec in $FP8_RUNS; do
  fp8_spec "$spec"
done
[[ "$BUDGET_S" =~ ^[0-9]+$ ]] || fail "BUDGET_S must be a number of seconds, got '$BUDGET_S'"

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee -a "$OUT/gpu_1p7b.log") 2>&1

echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) $MODEL seq $SEQ bf16, $SAMPLES_PER_STEP samples per step;" \
  "configurations: $CONFIGS; results in $OUT"
rm -rf "$OUT"/config_*.json "$OUT"/profile_* "$OUT"/fp8_*.json "$OUT"/torchtitan.json "$OUT"/long_seq.json "$OUT"/moe.json \
  "$OUT"/details.tar.gz
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
  limited "$CONFIG_TIMEOUT" "$PYTHON" "$ROOT/benchmarks/train_throughput.py" "${flags[@]}" \
    || echo "== configuration $index ($spec) failed, timed out or was skipped (exit $?)"
done

# The best bf16 configuration: the settings of the torchtitan and FP8 runs (in that order: BUDGET_S may cut the last).
best=$("$PYTHON" - "$OUT" $CONFIGS <<'EOF'
import json, sys
from pathlib import Path
rows = []
for index, spec in enumerate(sys.argv[2:], start=1):
    path = Path(sys.argv[1]) / f"config_{index}.json"
    ours = [r for r in json.loads(path.read_text())["results"] if r["impl"] == "ours"] if path.is_file() else []
    rows += [(r["tokens_per_s"], spec) for r in ours if "error" not in r]
print(max(rows)[1] if rows else "")
EOF
)
if [[ -z "$best" ]]; then
  echo "== no bf16 configuration ran: no FP8 or torchtitan runs"
else
  parse_config "$best"
  base=("${flags[@]}" --model "$MODEL" --seq-length "$SEQ" --iters "$ITERS" --warmup "$WARMUP" --dtype bf16
        --matmul-size "$MATMUL" --skip-hf)
  if [[ "$TORCHTITAN" == "1" ]]; then
    if "$PYTHON" -c "import torchtitan" 2>/dev/null; then
      echo "== torchtitan's Qwen3 at the best bf16 configuration $best"
      tt_flags=(--model "$MODEL" --seq-length "$SEQ" --micro-batch-size "$mbs" --iters "$ITERS" --warmup "$WARMUP"
                --accumulation "$((SAMPLES_PER_STEP / mbs))" --matmul-size "$MATMUL" --json "$OUT/torchtitan.json")
      [[ "$mode" == "compile" ]] && tt_flags+=(--compile)
      [[ "$recompute" != "none" ]] && tt_flags+=(--recompute "$recompute")
      [[ -n "$TT_ATTENTION" ]] && tt_flags+=(--attn-backend "$TT_ATTENTION")
      [[ "$PROFILE" == "1" ]] && tt_flags+=(--profile "$OUT/profile_torchtitan")
      limited "$CONFIG_TIMEOUT" "$PYTHON" "$ROOT/benchmarks/torchtitan_qwen3.py" "${tt_flags[@]}" \
        || echo "== torchtitan failed, timed out or was skipped (exit $?)"
    else
      echo "== torchtitan skipped: it does not import here (pip install qwen3-pretrain[bench])"
    fi
  fi
  for spec in $FP8_RUNS; do
    fp8_spec "$spec"
    name="fp8_${fp8_format}_${fp8_recipe}"
    echo "== $name at the best bf16 configuration $best"
    run_flags=("${base[@]}" --fp8-format "$fp8_format" --fp8-recipe "$fp8_recipe" --json "$OUT/$name.json")
    [[ "$PROFILE" == "1" ]] && run_flags+=(--profile "$OUT/profile_$name")
    limited "$CONFIG_TIMEOUT" "$PYTHON" "$ROOT/benchmarks/train_throughput.py" "${run_flags[@]}" \
      || echo "== $name failed, timed out or was skipped (exit $?)"
  done
fi

# single_run NAME DESCRIPTION FLAGS...: one more bf16 run of ours at micro batch 1 (compiled on accelerators),
# results in $OUT/NAME.json.
single_run() {
  local name="$1" what="$2" mode=(--compile)
  shift 2
  [[ "${BENCH_CPU:-0}" == "1" ]] && mode=()
  echo "== $what, micro batch 1, ${mode[*]:-eager}"
  limited "$CONFIG_TIMEOUT" "$PYTHON" "$ROOT/benchmarks/train_throughput.py" "$@" --micro-batch-size 1 \
    --accumulation 1 "${mode[@]}" --iters "$ITERS" --warmup "$WARMUP" --dtype bf16 --matmul-size "$MATMUL" \
    --skip-hf --json "$OUT/$name.json" || echo "== the $name run failed, timed out or was skipped (exit $?)"
}

if [[ "$LONG_SEQ" != "none" ]]; then
  [[ "$LONG_SEQ" =~ ^[1-9][0-9]*$ ]] || fail "LONG_SEQ must be a sequence length or none, got '$LONG_SEQ'"
  single_run long_seq "long context: $MODEL seq $LONG_SEQ, full recompute" --model "$MODEL" \
    --seq-length "$LONG_SEQ" --recompute full
fi

if [[ "$MOE_LAYERS" != "none" ]]; then
  [[ "$MOE_LAYERS" =~ ^[1-9][0-9]*$ ]] || fail "MOE_LAYERS must be a number of layers or none, got '$MOE_LAYERS'"
  single_run moe "mixture of experts: $MOE_MODEL cut to $MOE_LAYERS layers, seq $SEQ" --model "$MOE_MODEL" \
    --num-layers "$MOE_LAYERS" --seq-length "$SEQ"
fi

if [[ "$SAVE_PRESET" != "none" ]]; then
  echo "== checkpoint save stall: $SAVE_PRESET, synchronous vs --async-save"
  limited "$SAVE_TIMEOUT" "$PYTHON" "$ROOT/benchmarks/async_save.py" --preset "$SAVE_PRESET" --save-interval 2 \
    --seq-length 512 --workdir "$OUT" --json "$OUT/async_save.json" \
    || echo "== the save-stall measurement failed, timed out or was skipped (exit $?)"
fi

status=0
"$PYTHON" - "$OUT" "$SAMPLES_PER_STEP" $CONFIGS <<'EOF' || status=$?
"""Table of every configuration (throughput and, where profiled, the shares of the step's time), the best
one, and ours bf16 (best) / ours FP8 / torchtitan side by side; $OUT/summary.json."""
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


def first_result(name):
    """The one result of $OUT/<name>.json (an FP8 or torchtitan run), or a stand-in error."""
    path = out / f"{name}.json"
    if not path.is_file():
        return {"error": "no result (skipped, or see the log above)"}
    return json.loads(path.read_text())["results"][0]


side = []
if best:
    side.append({"run": f"ours bf16 {best['config']}", "result": best["ours"]})
    side += [{"run": f"ours {path.stem.replace('_', ' ')}", "result": first_result(path.stem)}
             for path in sorted(out.glob("fp8_*.json"))]
    side.append({"run": "torchtitan bf16", "result": first_result("torchtitan")})
    reference = best["ours"]["tokens_per_s"]
    titan = side[-1]["result"]
    print(f"\nSide by side at the best bf16 configuration's settings ({best['config']}): x ours bf16 and x torchtitan "
          "are tokens/s ratios")
    print(f"{'run':<30} {'tokens/s':>10} {'MFU':>6} {'MFU spec':>8} {'peak mem GB':>11} {'x ours bf16':>11} "
          f"{'x torchtitan':>12} {'matmul':>7} {'attn':>7} {'optim':>7} {'other':>7} {'busy':>7}")
    for entry in side:
        r = entry["result"]
        if "error" in r:
            print(f"{entry['run']:<30} {r['error']}")
            continue
        entry["x_ours_bf16"] = r["tokens_per_s"] / reference
        entry["x_torchtitan"] = r["tokens_per_s"] / titan["tokens_per_s"] if "error" not in titan else None
        spec = f"{100 * r['mfu_spec']:7.1f}%" if r.get("mfu_spec") is not None else f"{'-':>8}"
        vs_titan = f"{entry['x_torchtitan']:11.2f}x" if entry["x_torchtitan"] is not None else f"{'-':>12}"
        print(f"{entry['run']:<30} {r['tokens_per_s']:10.1f} {100 * r['mfu']:5.1f}% {spec} {r['peak_memory_gb']:11.2f} "
              f"{entry['x_ours_bf16']:10.2f}x {vs_titan} {shares(r)}")
summary = {"samples_per_step": samples_per_step, "configs": rows, "best": best["config"] if best else None,
           "side_by_side": [{"run": e["run"], "tokens_per_s": e["result"].get("tokens_per_s"),
                             "mfu": e["result"].get("mfu"), "mfu_spec": e["result"].get("mfu_spec"),
                             "peak_memory_gb": e["result"].get("peak_memory_gb"),
                             "x_ours_bf16": e.get("x_ours_bf16"), "x_torchtitan": e.get("x_torchtitan"),
                             "profile": e["result"].get("profile"), "error": e["result"].get("error")}
                            for e in side]}
tmp = out / "summary.json.tmp"
tmp.write_text(json.dumps(summary, indent=1) + "\n")
os.replace(tmp, out / "summary.json")
sys.exit(0 if best else 1)
EOF

if [[ "$PACK" == "1" ]]; then  # everything but the summary and the log, in one file
  (cd "$OUT" && find . -mindepth 1 -maxdepth 1 ! -name summary.json ! -name gpu_1p7b.log ! -name details.tar.gz \
     -printf '%P\n' | sort | tar -czf details.tar.gz -T - --remove-files)
  echo "== packed the per-run files into $OUT/details.tar.gz"
fi
exit "$status"
