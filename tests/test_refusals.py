"""What cannot be right is refused before it runs, in one line without a traceback: a model shape that differs
from the --load checkpoint's, non-finite or negative numbers, token ids beyond the vocabulary, damaged or empty
datasets, records without the --json-keys column, an unwritable --output-prefix; and during a run, non-finite
iterations are counted consistently and never checkpointed, and a full disk stops the save cleanly."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qwen3_pretrain.checkpoint.hf import iter_hf_tensors, save_pretrained
from qwen3_pretrain.checkpoint.mcore import McoreLayout, write_mcore_checkpoint
from qwen3_pretrain.cli import main as cli_main
from qwen3_pretrain.config import ConfigError, parse_train_args
from qwen3_pretrain.config.model import get_preset
from qwen3_pretrain.data import indexed
from qwen3_pretrain.data.indexed import TOKEN_RANGE_SUFFIX, IndexedDataset, IndexedDatasetWriter
from qwen3_pretrain.model import Qwen3ForCausalLM
from qwen3_pretrain.train import trainer
from qwen3_pretrain.train.preflight import prepare
from qwen3_pretrain.train.trainer import Trainer, run_training

from checkpoint_helpers import trained_native_checkpoint
from train_helpers import EOD, tiny_flags, write_tiny_dataset

CLI = Path(sys.executable).parent / "qwen3-pretrain"
TINY_VOCAB = 512  # qwen3-tiny's; write_tiny_dataset's ids stay below 501


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


def cli(*args: str | Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """`qwen3-pretrain ARGS` in a fresh process."""
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, timeout=timeout, check=False)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
    """The command failed with `code` and one stderr line holding every fragment, and no traceback."""
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---- numbers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("lr", "inf", "--lr must be a finite number, got inf"),
    ("lr", "nan", "--lr must be a finite number, got nan"),
    ("min-lr", "nan", "--min-lr must be a finite number"),
    ("weight-decay", "inf", "--weight-decay must be a finite number"),
    ("clip-grad", "nan", "--clip-grad must be a finite number"),
    ("adam-beta1", "nan", "--adam-beta1 must be a finite number"),
    ("adam-beta2", "inf", "--adam-beta2 must be a finite number"),
    ("adam-eps", "inf", "--adam-eps must be a finite number"),
    ("init-method-std", "nan", "--init-method-std must be a finite number"),
    ("init-method-std", "-0.02", "--init-method-std must be > 0, got -0.02"),
    ("loss-scale", "inf", "--loss-scale must be a finite number"),
    ("initial-loss-scale", "inf", "--initial-loss-scale must be a finite number"),
    ("min-loss-scale", "nan", "--min-loss-scale must be a finite number"),
    ("lr-warmup-init", "nan", "--lr-warmup-init must be a finite number"),
    ("rotary-base", "-1", "--rotary-base must be > 0"),
])
def test_non_finite_or_negative_numbers_are_refused(flag: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_train_args(tiny_flags("unused", **{flag: value}))


def test_lr_nan_is_one_line_without_traceback(dataset: str) -> None:
    proc = cli("train", *tiny_flags(dataset, lr="nan"))
    assert_one_line_error(proc, 2, "--lr must be a finite number, got nan")


# ---- the --load checkpoint's shape ----------------------------------------------------------------


def tiny_weights(tmp_path: Path) -> tuple[Qwen3ForCausalLM, Path, Path]:
    """A qwen3-tiny (2 layers, 4 heads / 2 kv heads, vocab 512, tied) as an HF directory and a TP-2 mcore
    checkpoint."""
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(dataclasses.replace(get_preset("qwen3-tiny"), torch_dtype="float32"))
    save_pretrained(model, tmp_path / "hf")
    layout = McoreLayout(tp=2, stage_layers=(model.config.num_hidden_layers,))
    write_mcore_checkpoint(iter_hf_tensors(tmp_path / "hf"), model.config, tmp_path / "mcore", layout)
    return model, tmp_path / "hf", tmp_path / "mcore"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same qwen3-tiny shape saved natively, as HF safetensors and as an mcore checkpoint."""
    root = tmp_path_factory.mktemp("checkpoints")
    _, native = trained_native_checkpoint(root, tied=True)
    _, hf, mcore = tiny_weights(root)
    return {"native": native, "hf": hf, "mcore": mcore}


@pytest.mark.parametrize(("fmt", "flags", "fragments"), [
    ("native", {"num_layers": 1}, ["num_hidden_layers 2 in the checkpoint, 1 from --num-layers"]),
    ("native", {"model": "qwen3-demo"},
     ["hidden_size 64 in the checkpoint, 256 from --model qwen3-demo", "vocab_size 512 in the checkpoint, 151936"]),
    ("hf", {"num_attention_heads": 8}, [
        "num_attention_heads 4 in the checkpoint, 8 from --num-attention-heads;",
        "num_key_value_heads 2 in the checkpoint, 8 from --num-attention-heads without --group-query-attention",
    ]),
    ("hf", {"hidden_size": 32, "ffn_hidden_size": 96},
     ["hidden_size 64 in the checkpoint, 32 from --hidden-size", "intermediate_size 128 in the checkpoint, 96"]),
    ("mcore", {"padded_vocab_size": 1024, "untie_embeddings_and_output_weights": True}, [
        "vocab_size 512 in the checkpoint, 1024 from --padded-vocab-size",
        "tie_word_embeddings True in the checkpoint, False from --untie-embeddings-and-output-weights",
    ]),
    ("mcore", {"group_query_attention": True, "num_query_groups": 4, "kv_channels": 8},
     ["num_key_value_heads 2 in the checkpoint, 4 from --num-query-groups", "head_dim 16 in the checkpoint, 8"]),
])
def test_load_of_another_shape_is_refused_naming_the_fields(
    dataset: str, checkpoints: dict[str, Path], fmt: str, flags: dict[str, Any], fragments: list[str]
) -> None:
    values = {"model": None, **flags}
    with pytest.raises(ConfigError) as caught:
        prepare(tiny_flags(dataset, load=checkpoints[fmt], **values))
    message = str(caught.value)
    assert message.startswith(f"--load {checkpoints[fmt]} holds a different model: "), message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("fmt", ["native", "hf", "mcore"])
def test_load_with_matching_shape_flags_or_preset(dataset: str, checkpoints: dict[str, Path], fmt: str) -> None:
    shape = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "group_query_attention": True,
             "num_query_groups": 2, "ffn_hidden_size": 128, "padded_vocab_size": TINY_VOCAB}
    config = prepare(tiny_flags(dataset, load=checkpoints[fmt], model=None, **shape))
    assert config.require_resolved().model_config.num_hidden_layers == 2
    prepare(tiny_flags(dataset, load=checkpoints[fmt]))  # --model qwen3-tiny: the checkpoint's own shape


# ---- datasets -----------------------------------------------------------------------------------


def write_documents(prefix: Path, documents: list[list[int]], dtype: type[np.number] = np.uint16) -> str:
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for document in documents:
            writer.add_document(document)
        writer.finalize()
    return str(prefix)


def out_of_vocab_dataset(prefix: Path) -> str:
    """The tiny dataset plus one document holding token 600 (>= qwen3-tiny's 512)."""
    tiny = IndexedDataset(write_tiny_dataset(prefix.with_name("base")))
    documents = [tiny[i].tolist() for i in range(len(tiny))]
    return write_documents(prefix, [*documents[:70], [5, 600, 7, EOD], *documents[70:]])


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = out_of_vocab_dataset(tmp_path / "wide")
    with pytest.raises(ConfigError, match=re.escape(
        f"--data-path {prefix}: {prefix}.bin holds token id 600 but the model's vocabulary is 512 (ids 0..511)"
    )):
        prepare(tiny_flags(prefix))
    assert cli_main(["data", "info", prefix]) == 0
    assert "token ids:  min 0, max 600" in capsys.readouterr().out
    prepare(tiny_flags(prefix, padded_vocab_size=640, model=None, num_layers=2, hidden_size=64,
                       num_attention_heads=4, ffn_hidden_size=128))  # a model large enough takes it


def test_token_id_range_is_scanned_once_per_version_of_the_bin(
    dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = write_tiny_dataset(tmp_path / "tiny")
    prepare(tiny_flags(prefix))
    cached = json.loads(Path(prefix + TOKEN_RANGE_SUFFIX).read_text())
    tokens = np.fromfile(prefix + ".bin", dtype=np.uint16)
    assert (cached["min"], cached["max"]) == (tokens.min(), tokens.max())
    scans: list[str] = []
    real_validate = IndexedDataset.validate
    monkeypatch.setattr(IndexedDataset, "validate", lambda self: scans.append(self.prefix) or real_validate(self))
    prepare(tiny_flags(prefix))
    assert scans == []  # read from the cache
    out_of_vocab_dataset(tmp_path / "tiny")  # rewrites tiny.bin/.idx: another size and mtime
    with pytest.raises(ConfigError, match="holds token id 600"):
        prepare(tiny_flags(prefix))
    assert scans == [prefix]


def test_token_id_range_of_a_read_only_dataset_is_cached_in_the_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix, cache = write_tiny_dataset(tmp_path / "data" / "tiny"), tmp_path / "cache"
    real_write = indexed._write_atomically

    def read_only_data_dir(path: str, content: str) -> None:
        if not path.startswith(str(cache)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        real_write(path, content)

    monkeypatch.setattr(indexed, "_write_atomically", read_only_data_dir)
    expected = IndexedDataset(prefix).token_id_range(str(cache))
    assert not Path(prefix + TOKEN_RANGE_SUFFIX).exists() and len(list(cache.glob("*" + TOKEN_RANGE_SUFFIX))) == 1
    monkeypatch.setattr(IndexedDataset, "validate", lambda self: pytest.fail("scanned again"))
    assert IndexedDataset(prefix).token_id_range(str(cache)) == expected


@pytest.mark.parametrize(("damage", "fragment"), [
    ("magic", ".idx is not a Megatron index file"),
    ("short-bin", ".bin is truncated"),
    ("long-bin", ".bin is longer than its index"),
    ("short-idx", ".idx is"),
    ("header", ".idx: unknown dtype code 99"),
])
def test_damaged_datasets_are_refused_in_one_line(
    tmp_path: Path, dataset: str, damage: str, fragment: str
) -> None:
    prefix = write_tiny_dataset(tmp_path / "tiny")
    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    if damage == "magic":
        idx.write_bytes(b"NOTANIDX!" + idx.read_bytes()[9:])
    elif damage == "short-bin":
        bin_.write_bytes(bin_.read_bytes()[:-2])
    elif damage == "long-bin":
        bin_.write_bytes(bin_.read_bytes() + b"\0\0")
    elif damage == "short-idx":
        idx.write_bytes(idx.read_bytes()[:-8])
    else:
        data = bytearray(idx.read_bytes())
        data[17] = 99  # the dtype code
        idx.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=re.escape(f"--data-path {prefix}: {prefix}")) as caught:
        prepare(tiny_flags(prefix))
    assert fragment in str(caught.value)
    if damage == "magic":
        assert_one_line_error(cli("train", *tiny_flags(prefix)), 2, f"{prefix}.idx is not a Megatron index file")


def test_empty_dataset_is_refused(tmp_path: Path, dataset: str) -> None:
    empty = write_documents(tmp_path / "empty", [])
    with pytest.raises(ConfigError, match=re.escape(f"--data-path {empty}: the dataset is empty (0 documents")):
        prepare(tiny_flags(empty))
    blend = ["0.5", dataset, "0.5", empty]
    with pytest.raises(ConfigError, match="the dataset is empty"):
        prepare([*tiny_flags(dataset, data_path=None), "--data-path", *blend])


# ---- preprocess ---------------------------------------------------------------------------------


def preprocess(tokenizer: Path, *args: str | Path) -> int:
    return cli_main(["preprocess", "--tokenizer-name-or-path", str(tokenizer), *map(str, args)])


def test_record_without_the_json_key_mid_file(
    tmp_path: Path, qwen3_tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jsonl = tmp_path / "in.jsonl"
    records = [{"text": "one"}, {"text": "two"}, {"content": "no text here"}, {"text": None}, {"text": "four"}]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert preprocess(qwen3_tokenizer_dir, "--input", jsonl, "--output-prefix", tmp_path / "a") == 1
    err = capsys.readouterr().err
    assert f"{jsonl}:3: column(s) 'text' not found; the file has columns 'content' in this record" in err
    assert "--skip-bad-lines" in err and not list(tmp_path.glob("a_*"))

    assert preprocess(qwen3_tokenizer_dir, "--input", jsonl, "--output-prefix", tmp_path / "b",
                      "--skip-bad-lines") == 0
    out = capsys.readouterr().out
    assert "skipped 1 empty" in out and "skipped 0 bad lines and 1 records missing a column" in out
    assert len(IndexedDataset(tmp_path / "b_text_document")) == 3

    array = tmp_path / "in.json"
    array.write_text(json.dumps(records))
    assert preprocess(qwen3_tokenizer_dir, "--input", array, "--output-prefix", tmp_path / "c") == 1
    assert f"{array}: element 2 of the JSON array: column(s) 'text' not found" in capsys.readouterr().err

    wrong_key = ("--input", jsonl, "--json-keys", "body", "--skip-bad-lines", "--output-prefix", tmp_path / "d")
    assert preprocess(qwen3_tokenizer_dir, *wrong_key) == 1  # no record has it: the wrong --json-keys
    assert f"{jsonl}: column(s) 'body' not found; the file has columns 'text'" in capsys.readouterr().err


def test_unwritable_output_prefix_is_one_line(tmp_path: Path, qwen3_tokenizer_dir: Path) -> None:
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(json.dumps({"text": "hello"}) + "\n")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    proc = cli("preprocess", "--input", jsonl, "--tokenizer-name-or-path", qwen3_tokenizer_dir,
               "--output-prefix", not_a_dir / "sub" / "out")
    prefix = not_a_dir / "sub" / "out"
    assert_one_line_error(proc, 1, f"--output-prefix {prefix}: cannot write {prefix}_text_document.bin: Not a dir")


# ---- non-finite iterations ------------------------------------------------------------------------


def log_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(" [")]


def field(line: str, name: str) -> float:
    match = re.search(rf"{name}: +(\S+) \|", line)
    assert match, line
    return float(match.group(1))


def test_nonfinite_loss_with_finite_gradients_is_a_nan_iteration(
    dataset: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Iteration 2's reported loss is NaN while its gradients (and update) are fine."""
    real = Trainer._forward_backward

    def poisoned(self: Trainer, *args: Any) -> torch.Tensor:
        loss_sum = real(self, *args)
        return loss_sum * float("nan") if self.state.iteration == 1 else loss_sum

    monkeypatch.setattr(Trainer, "_forward_backward", poisoned)
    result = run_training(parse_train_args(tiny_flags(dataset, log_interval=1)))
    assert result.skipped == [False] * 6 and math.isnan(result.losses[1])
    lines = log_lines(capsys.readouterr().out)
    assert math.isnan(field(lines[1], "lm loss")) and field(lines[1], "number of nan iterations") == 1
    assert all(field(line, "number of nan iterations") == 0 for line in lines[:1] + lines[2:])


def test_log_loss_is_nan_only_beside_nan_iterations(dataset: str, capsys: pytest.CaptureFixture[str]) -> None:
    """fp16 overflows skip whole log intervals of finite losses: the line shows their loss, not NaN."""
    flags = tiny_flags(dataset, fp16=True, initial_loss_scale=2.0**24, hysteresis=1, log_interval=1)
    result = run_training(parse_train_args(flags))
    assert result.skipped[0] and all(math.isfinite(loss) for loss in result.losses)
    for line, loss in zip(log_lines(capsys.readouterr().out), result.losses, strict=True):
        assert field(line, "lm loss") == pytest.approx(loss, rel=1e-6), line


def test_no_checkpoint_of_a_nonfinite_iteration(
    dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Iterations 2 and 6 are non-finite: the save due at 2 waits for 3, and the run ends without saving 6."""
    micro_batches = 4
    poisoned = {micro_batches * 1 + 1, micro_batches * 5 + 1}  # a micro batch of iterations 2 and 6
    real = trainer.token_loss_sum
    calls = {"n": 0}

    def token_loss_sum(*args: Any) -> torch.Tensor:
        calls["n"] += 1
        loss = real(*args)
        return loss * float("nan") if calls["n"] in poisoned else loss

    monkeypatch.setattr(trainer, "token_loss_sum", token_loss_sum)
    save = tmp_path / "ck"
    result = run_training(parse_train_args(tiny_flags(dataset, save=save, save_interval=2, log_interval=1)))
    assert result.skipped == [False, True, False, False, False, True]
    assert [p.name for p in result.checkpoints] == ["iter_0000003", "iter_0000004"]
    assert sorted(p.name for p in save.iterdir() if p.name.startswith("iter_")) == ["iter_0000003", "iter_0000004"]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    out = capsys.readouterr().out
    assert "not saving a checkpoint at iteration 2: its loss or gradients were not finite" in out
    assert out.count("not saving a checkpoint at iteration 6") == 1


# ---- a full disk ----------------------------------------------------------------------------------


def test_disk_full_during_a_save_stops_cleanly(
    dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save = tmp_path / "ck"
    real = trainer.save_checkpoint

    def fill_the_disk(save_dir: str | Path, iteration: int, *args: Any, **kwargs: Any) -> Path:
        if iteration < 4:
            return real(save_dir, iteration, *args, **kwargs)
        staging = Path(save_dir) / f".iter_{iteration:07d}.incomplete"
        staging.mkdir()
        (staging / "__0_0.distcp").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(trainer, "save_checkpoint", fill_the_disk)
    with pytest.raises(trainer.TrainingError, match=re.escape(
        f"no space left on device while saving the checkpoint of iteration 4 to {save} (its partial files were "
        "removed); free space there or point --save elsewhere, then resume with --load (last saved: iteration 2)"
    )):
        run_training(parse_train_args(tiny_flags(dataset, save=save, save_interval=2)))
    assert (save / "iter_0000002").is_dir() and not [p for p in save.iterdir() if "iter_0000004" in p.name]


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 400 KiB tmpfs (needs root and mount rights; skipped elsewhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)],
                                           capture_output=True, check=False).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_real_full_disk_is_one_line_and_leaves_no_partial_save(dataset: str, small_filesystem: Path) -> None:
    """torch's zip writer reports a full disk without its errno: the free space tells."""
    save = small_filesystem / "ck"
    proc = cli("train", *tiny_flags(dataset, save=save, train_iters=3, lr_warmup_iters=1, run_dir=save.parent))
    assert_one_line_error(proc, 1, "no space left on device while saving the checkpoint of iteration 3")
    assert not [p for p in save.iterdir() if "iter_" in p.name]
