"""`qwen3-pretrain demo`: the whole pipeline on an embedded corpus, no downloads.

offline Qwen3 tokenizer -> standard-library docstrings as a parquet -> `preprocess` to Megatron
indexed files -> `train` a small Qwen3 (real 151,936-token vocabulary) -> native checkpoint ->
`export` to HF safetensors -> loss curve PNG -> a generated sample.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# (documents, train iterations, seq length, micro batch, global batch) per size of run
RUNS: dict[str, tuple[int, int, int, int, int]] = {
    "full": (2000, 40, 128, 2, 4),
    "quick": (300, 8, 64, 2, 4),
}
PROMPT = "Return the"


@dataclass(frozen=True)
class DemoPaths:
    """Where each stage writes, under one output directory."""

    root: Path

    @property
    def corpus(self) -> Path:
        return self.root / "corpus" / "stdlib_docstrings.parquet"

    @property
    def data_prefix(self) -> Path:
        return self.root / "data" / "stdlib"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def hf_model(self) -> Path:
        return self.root / "hf_model"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"


def _stage(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def train_flags(paths: DemoPaths, tokenizer_dir: Path, run: str) -> list[str]:
    """The `qwen3-pretrain train` flags of the demo run (printed so users can rerun or adapt them)."""
    _, iters, seq, micro, global_batch = RUNS[run]
    return [
        "--model", "qwen3-demo",
        "--tokenizer-name-or-path", str(tokenizer_dir),
        "--data-path", f"{paths.data_prefix}_text_document",
        "--split", "98,2,0",
        "--seq-length", str(seq),
        "--micro-batch-size", str(micro),
        "--global-batch-size", str(global_batch),
        "--train-iters", str(iters),
        "--lr", "2e-3", "--min-lr", "2e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", str(max(1, iters // 20)),
        "--weight-decay", "0.1", "--clip-grad", "1.0", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
        "--init-method-std", "0.02", "--seed", "42",
        "--log-interval", str(max(1, iters // 20)),
        "--eval-interval", str(max(1, iters // 2)), "--eval-iters", "2",
        "--save", str(paths.checkpoints), "--save-interval", str(iters),
        "--tensorboard-dir", str(paths.tensorboard),
        "--num-workers", "0",
    ]


def run_demo(output_dir: Path, run: str = "full", force: bool = False) -> dict[str, float]:
    """Run every stage into `output_dir`; returns the first and last training loss."""
    from qwen3_pretrain.checkpoint.export import export_native_to_hf
    from qwen3_pretrain.config import parse_train_args
    from qwen3_pretrain.data import preprocess
    from qwen3_pretrain.demo_corpus import write_corpus_parquet
    from qwen3_pretrain.tokenizer import ensure_qwen3_tokenizer
    from qwen3_pretrain.train.plot import plot_metrics
    from qwen3_pretrain.train.trainer import run_training

    paths = DemoPaths(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        if not force:
            raise FileExistsError(
                f"{output_dir} already holds a demo run; pass --force to replace it or --output-dir NEW"
            )
        import shutil

        shutil.rmtree(output_dir)
    documents = RUNS[run][0]

    _stage("1/6 tokenizer (offline Qwen3 BPE)")
    tokenizer_dir = ensure_qwen3_tokenizer()
    print(f"tokenizer: {tokenizer_dir}")

    _stage("2/6 corpus (standard-library docstrings)")
    count = write_corpus_parquet(paths.corpus, documents)
    print(f"wrote {count} documents to {paths.corpus}")

    _stage("3/6 preprocess -> Megatron indexed dataset")
    code = preprocess.main([
        "--input", str(paths.corpus), "--tokenizer-name-or-path", str(tokenizer_dir),
        "--tokenizer-type", "PretrainedFromHF", "--handler-name", "GeneralPretrainHandler",
        "--output-prefix", str(paths.data_prefix), "--json-keys", "text", "--append-eod", "--workers", "1",
    ])
    if code:
        raise RuntimeError(f"preprocess failed with exit code {code}")

    _stage("4/6 train")
    flags = train_flags(paths, tokenizer_dir, run)
    print("qwen3-pretrain train " + " ".join(flags), flush=True)
    result = run_training(parse_train_args(flags))
    losses = [loss for loss in result.losses if not math.isnan(loss)]

    _stage("5/6 export to HF safetensors + loss curve")
    export_native_to_hf(paths.checkpoints, paths.hf_model, tokenizer_dir)
    png = plot_metrics(paths.checkpoints)
    print(f"loss curve: {png}")

    _stage("6/6 generate")
    print(f"{PROMPT!r} -> {generate_sample(paths.hf_model, PROMPT)!r}")
    summary = {"first_loss": losses[0], "last_loss": losses[-1]}
    print(f"\ndemo done in {output_dir}: loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}")
    return summary


def generate_sample(model_dir: Path, prompt: str, new_tokens: int = 24) -> str:
    """Greedy continuation of `prompt` by the exported HF model."""
    import torch

    from qwen3_pretrain.checkpoint.hf import load_pretrained
    from qwen3_pretrain.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = load_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, eos_token_id=tokenizer.eos_token_id)
    continuation = tokenizer.decode(out[0, ids.shape[1]:].tolist())
    assert isinstance(continuation, str)  # one sequence of ids decodes to one string
    return prompt + continuation


def main(argv: list[str]) -> int:
    """CLI: `qwen3-pretrain demo [--quick] [--output-dir DIR] [--force]`."""
    parser = argparse.ArgumentParser(prog="qwen3-pretrain demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="demo_run", help="where every stage writes (default ./demo_run)")
    parser.add_argument("--quick", action="store_true", help="a tiny run of a few iterations (CI smoke test)")
    parser.add_argument("--force", action="store_true", help="replace an existing demo run in --output-dir")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        run_demo(Path(args.output_dir), "quick" if args.quick else "full", args.force)
    except FileExistsError as exc:
        print(f"qwen3-pretrain demo: {exc}", file=sys.stderr)
        return 2
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0
