"""Preprocessing side by side: `qwen3-pretrain preprocess` (each engine) vs Megatron-LM's tools.

Methods, all on one JSONL corpus with the same tokenizer, EOD appended:
- `ours-<engine>`: `qwen3-pretrain preprocess --tokenizer-engine <engine>` (one process, all cores), and
  `ours-gigatoken-wN` with `--workers N`;
- `megatron-classic`: Megatron-LM `tools/preprocess_data.py --workers N` (HF tokenizer per document in a pool);
- `megatron-fast`: Megatron-LM `tools/preprocess_data_fast.py --use-gigatoken` (whole files in memory);
- `gigatoken-path`: what megatron-fast runs, timed alone without its imports: gigatoken `encode_files` of the
  JSONL plus Megatron's `IndexedDatasetBuilder.add_documents` and `finalize` (tokenize + write).

Each runs in a fresh interpreter; the gigatoken ones --repeat times, round-robin, reporting medians (the
machine may be shared). Reported: wall time of the whole command; processing time (ours: its `done:` line,
reading + tokenizing + writing; megatron-fast: its own "Elapsed time", which includes loading the
tokenizer; gigatoken-path: tokenize + write); MB/s and tokens/s of the processing time; CPU time; peak RSS
of the largest process; whether the .bin/.idx bytes equal those of the HF engine (`ours-hf`), and which
documents' tokens differ.

The corpus is built from the Python sources installed here (stdlib and site-packages, deduplicated by
content, one file per document) until --mb MB of text: unique text, no downloads.

Megatron-LM: --megatron DIR is an extracted snapshot (`git archive HEAD tools megatron | tar -x -C DIR`).
Its HEAD wants Python >= 3.12 (typing.override) and an importable triton: its subprocesses, and only they,
get `benchmarks/megatron_shim` on PYTHONPATH (a no-op typing.override and a triton stand-in for Megatron's
own modules) and DIR ahead of any installed megatron-core.

    python benchmarks/preprocess.py --mb 250 --workers 2 --megatron /tmp/mlm --repeat 5 [--methods ...] [--json F]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

from qwen3_pretrain.data.indexed import IndexedDataset

HERE = Path(__file__).resolve().parent
OURS_ENGINES = ("gigatoken", "tiktoken", "hf")
MEGATRON_METHODS = ("megatron-classic", "megatron-fast", "gigatoken-path")
REFERENCE = "ours-hf"
# Runs a command, then prints its wall time, CPU time and the peak RSS of its largest (waited-for) process.
MEASURE = (
    "import json, resource, subprocess, sys, time; t = time.perf_counter(); "
    "p = subprocess.run(sys.argv[2:], cwd=sys.argv[1], capture_output=True, text=True); "
    "wall = time.perf_counter() - t; u = resource.getrusage(resource.RUSAGE_CHILDREN); "
    "print(json.dumps({'rc': p.returncode, 'wall_s': wall, 'cpu_s': u.ru_utime + u.ru_stime, "
    "'peak_rss_mb': u.ru_maxrss / 1024, 'out': (p.stdout + p.stderr)[-3000:]}))"
)
# The gigatoken path of preprocess_data_fast.py without its imports: argv = tokenizer dir, input, prefix.
GIGATOKEN_PATH = """
import sys, time
import gigatoken as gt
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
fast = gt.Tokenizer(tokenizer).as_hf().tokenizer
start = time.perf_counter()
documents = fast.encode_files(gt.JsonlFileSource([sys.argv[2]], field="text"), parallel=True)
builder = IndexedDatasetBuilder(sys.argv[3] + ".bin", dtype=DType.optimal_dtype(len(tokenizer)))
builder.add_documents(documents, eod_token=tokenizer.eos_token_id)
builder.finalize(sys.argv[3] + ".idx")
print(f"TIMED {time.perf_counter() - start:.3f}")
"""


def write_corpus(path: Path, megabytes: float) -> tuple[int, int]:
    """JSONL of unique installed Python source files, one per document, until `megabytes` MB of text."""
    roots = sorted({sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]})
    seen: set[bytes] = set()
    documents = written = 0
    with open(path, "w", encoding="utf-8") as out:
        for root in roots:
            for folder, subfolders, names in os.walk(root):
                subfolders.sort()
                for name in sorted(n for n in names if n.endswith(".py")):
                    try:
                        text = Path(folder, name).read_text(encoding="utf-8")
                    except (OSError, UnicodeDecodeError):
                        continue
                    digest = hashlib.sha1(text.encode("utf-8")).digest()
                    if not text.strip() or digest in seen:
                        continue
                    seen.add(digest)
                    out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                    documents, written = documents + 1, written + len(text.encode("utf-8"))
                    if written >= megabytes * 1e6:
                        return documents, written
    return documents, written


def command(method: str, args: argparse.Namespace, corpus: Path, prefix: str) -> tuple[list[str], str, dict]:
    """(argv, working directory, extra environment) of one method; outputs go to `prefix`_text_document."""
    python, tokenizer = sys.executable, args.tokenizer
    if method.startswith("ours-"):
        engine, _, workers = method[len("ours-") :].partition("-w")
        cli = "from qwen3_pretrain.cli import main; raise SystemExit(main())"
        argv = [python, "-c", cli, "preprocess", "--input", str(corpus), "--tokenizer-name-or-path", tokenizer,
                "--output-prefix", prefix, "--append-eod", "--tokenizer-engine", engine, "--workers", workers or "1",
                "--log-interval", "100000000"]
        return argv, os.getcwd(), {}
    mlm = os.path.abspath(args.megatron)
    env = {"PYTHONPATH": os.pathsep.join([str(HERE / "megatron_shim"), mlm])}
    if method == "gigatoken-path":
        return [python, "-c", GIGATOKEN_PATH, tokenizer, str(corpus), f"{prefix}_text_document"], mlm, env
    tool = {"megatron-classic": "preprocess_data.py", "megatron-fast": "preprocess_data_fast.py"}[method]
    argv = [python, os.path.join("tools", tool), "--input", str(corpus), "--output-prefix", prefix,
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer, "--append-eod"]
    argv += ["--workers", str(args.workers)] if method == "megatron-classic" else ["--use-gigatoken"]
    return argv, mlm, env


def processing_seconds(method: str, out: str) -> float | None:
    """The method's own timing of its work, from its output (None when it prints none)."""
    patterns = {"ours": r"MB of text in ([\d.]+) s", "megatron-fast": r"Elapsed time: ([\d.]+) seconds",
                "gigatoken-path": r"TIMED ([\d.]+)"}
    pattern = patterns.get("ours" if method.startswith("ours-") else method)
    match = re.search(pattern, out) if pattern else None
    return float(match.group(1)) if match else None


def measure(method: str, args: argparse.Namespace, corpus: Path, prefix: str) -> dict:
    argv, cwd, env = command(method, args, corpus, prefix)
    run_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(filter(None, [env.get("PYTHONPATH"),
                                                                                 os.environ.get("PYTHONPATH")]))}
    result = json.loads(subprocess.run([sys.executable, "-c", MEASURE, cwd, *argv], env=run_env, check=True,
                                       capture_output=True, text=True).stdout)
    if result["rc"] != 0:
        raise SystemExit(f"{method} failed (exit {result['rc']}):\n{result['out']}")
    result["processing_s"] = processing_seconds(method, result["out"])
    del result["out"], result["rc"]
    return result


def median_run(runs: list[dict]) -> dict:
    """The median of each timing over repeated runs (and the largest peak RSS); the runs themselves kept."""
    keys = ("wall_s", "cpu_s", "processing_s")
    merged = {k: statistics.median(r[k] for r in runs) if runs[0][k] is not None else None for k in keys}
    return {**merged, "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "runs": runs}


def outputs(prefix: str) -> tuple[bytes, bytes]:
    return Path(f"{prefix}_text_document.bin").read_bytes(), Path(f"{prefix}_text_document.idx").read_bytes()


def differing_documents(prefix: str, reference: str) -> list[int]:
    """Indices of the documents whose tokens differ between two outputs (all of them if the counts differ)."""
    ours, theirs = IndexedDataset(f"{prefix}_text_document"), IndexedDataset(f"{reference}_text_document")
    if len(ours) != len(theirs):
        return list(range(max(len(ours), len(theirs))))
    return [i for i in range(len(ours)) if not np.array_equal(ours[i], theirs[i])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=50.0, help="MB of text in the generated corpus (default 50)")
    parser.add_argument("--input", help="an existing JSONL file with a 'text' key instead of the generated corpus")
    parser.add_argument("--workers", type=int, default=2, help="for megatron-classic and ours-gigatoken-wN")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the offline Qwen3 tokenizer)")
    parser.add_argument("--megatron", help="an extracted Megatron-LM snapshot (tools/, megatron/); else ours only")
    parser.add_argument("--methods", nargs="+", help="a subset of the methods to run (the reference ours-hf always)")
    parser.add_argument(
        "--repeat", type=int, default=1,
        help="run the fast (gigatoken) methods this many times, round-robin, and report the medians",
    )
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--workdir", help="keep the corpus and outputs here (default: a temporary directory)")
    args = parser.parse_args()
    if args.tokenizer is None:
        from qwen3_pretrain.tokenizer import ensure_qwen3_tokenizer

        args.tokenizer = str(ensure_qwen3_tokenizer())
    methods = [f"ours-{e}" for e in OURS_ENGINES] + [f"ours-gigatoken-w{args.workers}"]
    methods += list(MEGATRON_METHODS) if args.megatron else []
    if args.methods:
        methods = [m for m in methods if m in args.methods or m == REFERENCE]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        corpus = Path(args.input or os.path.join(tmp, "corpus.jsonl"))
        if not args.input:
            write_corpus(corpus, args.mb)
        with open(corpus, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        text_mb, documents = sum(len(t.encode("utf-8")) for t in texts) / 1e6, len(texts)
        del texts
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for round_index in range(args.repeat):  # round-robin, so that load from other jobs hits all alike
            for m in methods:
                if round_index == 0 or "gigatoken" in m or m == "megatron-fast":
                    runs[m].append(measure(m, args, corpus, os.path.join(tmp, m)))
        results = {m: median_run(r) for m, r in runs.items()}
        reference = outputs(os.path.join(tmp, REFERENCE))
        tokens = IndexedDataset(os.path.join(tmp, f"{REFERENCE}_text_document")).num_tokens
        for method, r in results.items():
            r["identical_to_hf"] = outputs(os.path.join(tmp, method)) == reference
            r["documents_differing"] = differing_documents(os.path.join(tmp, method), os.path.join(tmp, REFERENCE))
    print(f"{text_mb:.1f} MB of text, {documents} documents, {tokens} tokens (with EOD)")
    print(f"{'method':<22}{'wall s':>8}{'proc s':>8}{'MB/s':>8}{'Mtok/s':>8}{'CPU s':>8}{'peak RSS MB':>13}"
          f"  identical to HF (documents differing)")
    for method, r in results.items():
        seconds = r["processing_s"] or r["wall_s"]
        r.update(mb_per_s=text_mb / seconds, tokens_per_s=tokens / seconds)
        proc = f"{r['processing_s']:.2f}" if r["processing_s"] else "-"
        print(f"{method:<22}{r['wall_s']:>8.2f}{proc:>8}{r['mb_per_s']:>8.1f}{r['tokens_per_s'] / 1e6:>8.2f}"
              f"{r['cpu_s']:>8.1f}{r['peak_rss_mb']:>13.0f}  {r['identical_to_hf']} ({len(r['documents_differing'])})")
    print("(MB/s and tokens/s are of the processing time where the method reports one, else of the wall time)")
    summary = {"text_mb": text_mb, "documents": documents, "tokens": tokens, "workers": args.workers,
               "results": results}
    if "gigatoken-path" in results and "ours-gigatoken" in results:
        ratio = results["gigatoken-path"]["processing_s"] / results["ours-gigatoken"]["processing_s"]
        summary["ours_vs_gigatoken_path"] = ratio
        print(f"ours-gigatoken vs gigatoken-path (tokenize + write): {ratio:.2f}x the speed")
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if all(r["identical_to_hf"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
