"""Preprocessing throughput: `qwen3-pretrain preprocess` vs the Megatron-LM `tools/preprocess_data.py`
approach (HF tokenizer called per document in a multiprocessing pool, `imap` chunks of 32, written
with megatron-core's IndexedDatasetBuilder), on the same JSONL input, tokenizer and worker count.

Prints a table and a JSON line: wall time, MB/s of text, tokens/s and peak RSS (largest process) of
each, and checks both wrote the same tokens.

    python benchmarks/preprocess.py --mb 50 --workers 2 [--max-paragraphs 8] [--tokenizer DIR] [--input FILE.jsonl]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PARAGRAPHS = [
    "Give three tips for staying healthy. Eat a balanced diet, exercise regularly and sleep well. ",
    "保持健康的三个提示：均衡饮食，经常锻炼，保证充足的睡眠。每天喝足够的水也很重要。",
    "The quick brown fox jumps over the lazy dog while 42 engineers benchmark tokenizers in 2025. ",
    "机器学习是人工智能的一个分支，它使计算机能够从数据中学习而无需明确编程。",
    "def tokenize(text):\n    return [ord(c) for c in text]  # code, numbers 3.14159 and symbols {}[]<>\n",
]


def write_input(path: Path, megabytes: float, max_paragraphs: int) -> None:
    """JSONL documents of 1 to `max_paragraphs` mixed Chinese/English/code paragraphs, `megabytes` of text."""
    target, written, i = megabytes * 1e6, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            count = 1 + (i * 13) % max_paragraphs
            text = "".join(PARAGRAPHS[(i * 7 + k) % len(PARAGRAPHS)] for k in range(count))
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            written += len(text.encode("utf-8"))
            i += 1


class MegatronStyleEncoder:
    """What Megatron-LM's preprocess_data.py does per document with a HF tokenizer."""

    def __init__(self, tokenizer_dir: str) -> None:
        self.tokenizer_dir = tokenizer_dir

    def initializer(self) -> None:
        from transformers import AutoTokenizer

        MegatronStyleEncoder.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)

    def encode(self, line: str) -> tuple[list[int], int]:
        text = json.loads(line)["text"]
        ids = MegatronStyleEncoder.tokenizer(text).input_ids
        if ids:
            ids.append(MegatronStyleEncoder.tokenizer.eos_token_id)
        return ids, len(line)


def run_baseline(input_path: str, tokenizer_dir: str, prefix: str, workers: int) -> None:
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    encoder = MegatronStyleEncoder(tokenizer_dir)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    pool = multiprocessing.Pool(workers, initializer=encoder.initializer)
    with open(input_path, encoding="utf-8") as fin, pool:
        for ids, _ in pool.imap(encoder.encode, fin, 32):
            if ids:
                builder.add_item(torch.IntTensor(ids))
                builder.end_document()
    builder.finalize(f"{prefix}.idx")


def run_ours(input_path: str, tokenizer_dir: str, prefix: str, workers: int) -> None:
    from qwen3_pretrain.data.preprocess import main

    argv = ["--input", input_path, "--tokenizer-name-or-path", tokenizer_dir, "--output-prefix", prefix,
            "--append-eod", "--workers", str(workers), "--log-interval", "1000000"]
    if main(argv) != 0:
        raise SystemExit("preprocess failed")


def measure(method: str, input_path: str, tokenizer_dir: str, prefix: str, workers: int) -> dict:
    """Run one method in a fresh interpreter: wall time, CPU time of all its processes (the fairer
    measure on a shared machine) and the peak RSS of its largest process."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import json, resource, sys, time; sys.path.insert(0, {here!r}); import preprocess as b; "
        f"t = time.perf_counter(); b.run_{method}({input_path!r}, {tokenizer_dir!r}, {prefix!r}, {workers:d}); "
        "wall = time.perf_counter() - t; "
        "usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]; "
        "rss = max(u.ru_maxrss for u in usage); cpu = sum(u.ru_utime + u.ru_stime for u in usage); "
        "print('RESULT ' + json.dumps({'wall_s': wall, 'cpu_s': cpu, 'peak_rss_mb': rss / 1024}))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=50.0, help="MB of text to generate (default 50)")
    parser.add_argument(
        "--max-paragraphs", type=int, default=8,
        help="generated documents have 1..N paragraphs (default 8: ~460 bytes on average, like Alpaca's text)",
    )
    parser.add_argument("--input", help="an existing JSONL file with a 'text' key instead of generated text")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the offline Qwen3 tokenizer)")
    args = parser.parse_args()
    if args.tokenizer is None:
        from qwen3_pretrain.tokenizer import ensure_qwen3_tokenizer

        args.tokenizer = str(ensure_qwen3_tokenizer())
    with tempfile.TemporaryDirectory() as tmp:
        input_path = args.input or os.path.join(tmp, "input.jsonl")
        if not args.input:
            write_input(Path(input_path), args.mb, args.max_paragraphs)
        with open(input_path, encoding="utf-8") as f:
            text_mb = sum(len(json.loads(line)["text"].encode()) for line in f) / 1e6
        results = {}
        for method in ("baseline", "ours"):
            prefix = os.path.join(tmp, method)
            results[method] = measure(method, input_path, args.tokenizer, prefix, args.workers)
        from qwen3_pretrain.data.indexed import IndexedDataset

        ours, base = Path(tmp, "ours_text_document.bin"), Path(tmp, "baseline.bin")
        identical = ours.read_bytes() == base.read_bytes()
        written = IndexedDataset(os.path.join(tmp, "baseline"))
        tokens, documents = written.num_tokens, len(written)
    print(f"{text_mb:.1f} MB of text, {documents} documents, {tokens} tokens, {args.workers} worker(s); "
          f"outputs identical: {identical}")
    print(f"{'method':<28}{'wall s':>9}{'MB/s':>9}{'tokens/s':>12}{'CPU s':>9}{'MB/CPU s':>10}{'peak RSS MB':>13}")
    for method, name in (("baseline", "Megatron-style HF pool"), ("ours", "qwen3-pretrain preprocess")):
        r = results[method]
        r.update(mb_per_s=text_mb / r["wall_s"], tokens_per_s=tokens / r["wall_s"], mb_per_cpu_s=text_mb / r["cpu_s"])
        print(f"{name:<28}{r['wall_s']:>9.1f}{r['mb_per_s']:>9.2f}{r['tokens_per_s']:>12.0f}"
              f"{r['cpu_s']:>9.1f}{r['mb_per_cpu_s']:>10.2f}{r['peak_rss_mb']:>13.0f}")
    speedup = results["baseline"]["wall_s"] / results["ours"]["wall_s"]
    cpu_speedup = results["baseline"]["cpu_s"] / results["ours"]["cpu_s"]
    print(f"speedup: {speedup:.2f}x wall, {cpu_speedup:.2f}x CPU time")
    print(json.dumps({"text_mb": text_mb, "documents": documents, "tokens": tokens, "workers": args.workers,
                      "identical": identical, "speedup": speedup, "cpu_speedup": cpu_speedup, **results}))
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
