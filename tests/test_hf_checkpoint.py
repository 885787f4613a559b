"""HF safetensors in and out: transformers <-> ours with identical tensors, sharding, clear errors."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from qwen3_pretrain.checkpoint.hf import (
    INDEX_FILE,
    SINGLE_FILE,
    HFCheckpointError,
    hf_tensor_locations,
    iter_hf_tensors,
    load_hf_state_dict,
    load_pretrained,
    save_hf_state_dict,
    save_pretrained,
)
from qwen3_pretrain.model import Qwen3Config

transformers.logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)


def hf_config(tied: bool) -> transformers.Qwen3Config:
    return transformers.Qwen3Config(
        vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, max_position_embeddings=64, rope_theta=5000.0,
        tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1,
    )


def hf_model(tied: bool, seed: int = 0) -> transformers.Qwen3ForCausalLM:
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(hf_config(tied)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)  # norms too, so a swapped tensor cannot hide among ones
    return model


def saved_names(directory: Path) -> set[str]:
    names: set[str] = set()
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            names |= set(handle.keys())
    return names


def assert_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_save_loads_into_ours(tied: bool, tmp_path: Path) -> None:
    ref = hf_model(tied)
    ref.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path, dtype=torch.float32).eval()

    assert ours.config.tie_word_embeddings is tied and ours.config.head_dim == 12
    assert ours.config.rope_theta == 5000.0
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    assert_same_tensors(ours.state_dict(), ref.state_dict())
    ids = torch.randint(0, 80, (2, 7))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_our_save_loads_into_transformers(tied: bool, tmp_path: Path) -> None:
    ours = load_pretrained(_saved_by_hf(tied, tmp_path / "src"))
    save_pretrained(ours, tmp_path / "out")

    assert ("lm_head.weight" in saved_names(tmp_path / "out")) == (not tied)
    ref = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "out")
    assert ref.config.tie_word_embeddings is tied
    assert_same_tensors(ours.state_dict(), ref.state_dict())


def _saved_by_hf(tied: bool, directory: Path) -> Path:
    hf_model(tied, seed=1).save_pretrained(directory)
    return directory


def test_sharded_save_round_trips_through_both(tmp_path: Path) -> None:
    ours = load_pretrained(_saved_by_hf(False, tmp_path / "src"))
    save_pretrained(ours, tmp_path / "out", max_shard_bytes=8_000)

    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(shards) >= 4 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in ours.hf_state_dict().values())
    for shard in (tmp_path / "out").glob("*.safetensors"):
        names = [n for n, f in index["weight_map"].items() if f == shard.name]
        assert len(names) == 1 or sum(ours.state_dict()[n].nbytes for n in names) <= 8_000

    again = load_pretrained(tmp_path / "out")
    ref = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "out")
    assert_same_tensors(again.state_dict(), ours.state_dict())
    assert_same_tensors(ref.state_dict(), ours.state_dict())


def test_save_pretrained_casts_and_records_dtype(tmp_path: Path) -> None:
    ours = load_pretrained(_saved_by_hf(True, tmp_path / "src"))
    save_pretrained(ours, tmp_path / "bf16", dtype=torch.bfloat16)
    assert Qwen3Config.from_pretrained(tmp_path / "bf16").torch_dtype == "bfloat16"
    loaded = load_pretrained(tmp_path / "bf16")  # dtype from config.json
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.model.norm.weight, ours.model.norm.weight.bfloat16())


def test_streaming_save_of_a_generator_and_dtype_on_read(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.randn(10, 10) for i in range(5)} | {"ids": torch.arange(4)}
    shared = torch.randn(6, 4)
    tensors |= {"view_a": shared[:3], "view_b": shared[3:], "same": tensors["t0"]}  # shared storage is copied
    save_hf_state_dict(((k, v) for k, v in tensors.items()), tmp_path, max_shard_bytes=900)

    assert len(list(tmp_path.glob("model-*.safetensors"))) >= 3 and not (tmp_path / SINGLE_FILE).exists()
    assert_same_tensors(load_hf_state_dict(tmp_path), tensors)
    cast = dict(iter_hf_tensors(tmp_path, dtype=torch.bfloat16))
    assert cast["t1"].dtype == torch.bfloat16 and cast["ids"].dtype == torch.int64


def test_resave_replaces_old_shards_and_keeps_other_files(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    save_hf_state_dict({f"t{i}": torch.randn(100) for i in range(4)}, tmp_path, max_shard_bytes=500)
    save_hf_state_dict({"only": torch.ones(3)}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_FILE, "tokenizer.json"]
    assert list(load_hf_state_dict(tmp_path)) == ["only"]


def test_failed_save_leaves_nothing_that_looks_complete(tmp_path: Path) -> None:
    def tensors():
        yield "a", torch.randn(100)
        yield "b", torch.randn(100)
        raise RuntimeError("producer failed")

    with pytest.raises(RuntimeError, match="producer failed"):
        save_hf_state_dict(tensors(), tmp_path, max_shard_bytes=500)
    assert list(tmp_path.iterdir()) == []


def test_missing_or_corrupt_checkpoints_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(HFCheckpointError, match="does not exist"):
        load_hf_state_dict(tmp_path / "nope")
    with pytest.raises(HFCheckpointError, match=f"neither {SINGLE_FILE} nor {INDEX_FILE}"):
        load_hf_state_dict(tmp_path)

    save_hf_state_dict({f"t{i}": torch.randn(100) for i in range(3)}, tmp_path, max_shard_bytes=500)
    second = tmp_path / "model-00002-of-00003.safetensors"
    second.write_bytes(second.read_bytes()[:-7])
    with pytest.raises(HFCheckpointError, match=f"{second}.*not a valid safetensors"):
        load_hf_state_dict(tmp_path)
    second.unlink()
    with pytest.raises(HFCheckpointError, match=f"shard {second} listed in .* is missing"):
        load_hf_state_dict(tmp_path)
    (tmp_path / INDEX_FILE).write_text("{not json")
    with pytest.raises(HFCheckpointError, match=f"{tmp_path / INDEX_FILE} is corrupt"):
        load_hf_state_dict(tmp_path)
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"extra": "model-00001-of-00003.safetensors"}}))
    with pytest.raises(HFCheckpointError, match="lacks tensors its index lists: \\['extra'\\]"):
        load_hf_state_dict(tmp_path)


def test_reader_matches_safetensors_for_every_dtype_and_shape(tmp_path: Path) -> None:
    tensors = {
        "bf16": torch.randn(3, 5).bfloat16(), "f16": torch.randn(7).half(), "f64": torch.randn(2, 2, 2).double(),
        "i64": torch.arange(-3, 3), "i8": torch.arange(-4, 4, dtype=torch.int8),
        "u8": torch.arange(9, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
        "f8": torch.randn(6).to(torch.float8_e4m3fn), "u16": torch.arange(5, dtype=torch.int32).to(torch.uint16),
    }
    save_file(tensors, str(tmp_path / SINGLE_FILE), metadata={"format": "pt"})
    ours = load_hf_state_dict(tmp_path)
    with safe_open(str(tmp_path / SINGLE_FILE), framework="pt") as handle:
        names = handle.keys()  # a safe_open handle is not iterable itself
        theirs = {name: handle.get_tensor(name) for name in names}
    assert set(ours) == set(theirs) == set(tensors)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and ours[name].shape == tensor.shape, name
        assert ours[name].reshape(-1).view(torch.uint8).tolist() == tensor.reshape(-1).view(torch.uint8).tolist(), name
        assert ours[name].untyped_storage().nbytes() == tensor.nbytes  # a fresh tensor owning its storage


def test_reader_follows_order_and_maps_no_file(tmp_path: Path) -> None:
    save_hf_state_dict({f"t{i}": torch.full((50,), float(i)) for i in range(6)}, tmp_path, max_shard_bytes=500)
    order = ["t5", "t0", "t3"]
    names = []
    for name, tensor in iter_hf_tensors(tmp_path, order=order):
        maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
        assert str(tmp_path) not in maps  # read with file reads, never memory-mapped
        assert torch.equal(tensor, torch.full((50,), float(name[1:])))
        names.append(name)
    assert names == ["t5", "t0", "t3", "t1", "t2", "t4"]  # the rest in file order


def _with_header(path: Path, header: dict, data: bytes = b"") -> Path:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


@pytest.mark.parametrize(
    "header, data, reason",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 7, "ends at byte .* \\(truncated\\)"),
        (
            {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
            b"\0" * 12,
            "needs 12 bytes, its data_offsets span 8",
        ),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "dtype 'Q4', not one of"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "shape \\[-2\\]"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "data_offsets \\[8, 0\\]"),
        ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "lacks a dtype, shape or \\[begin, end\\] data_offsets"),
        ({"a": "F32"}, b"", "header entry 'a' lacks"),
        (["a"], b"", "header is not a JSON object"),
    ],
)
def test_corrupt_headers_name_the_file(tmp_path: Path, header: dict, data: bytes, reason: str) -> None:
    path = _with_header(tmp_path / SINGLE_FILE, header, data)
    with pytest.raises(HFCheckpointError, match=f"{path} is not a valid safetensors file \\(.*{reason}"):
        hf_tensor_locations(tmp_path)


def test_truncated_or_garbage_prefix_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / SINGLE_FILE
    for content, reason in (
        (b"\1\2\3", "3 bytes is too short"),
        (struct.pack("<Q", 2**40) + b"{}", "header length 1099511627776 exceeds"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "its header is not JSON"),
    ):
        path.write_bytes(content)
        with pytest.raises(HFCheckpointError, match=f"{path} is not a valid safetensors file \\({reason}"):
            list(iter_hf_tensors(tmp_path))


def test_file_shrunk_after_its_header_was_read(tmp_path: Path) -> None:
    save_hf_state_dict({"a": torch.ones(100), "b": torch.ones(100)}, tmp_path)
    stream = iter_hf_tensors(tmp_path, order=["a", "b"])
    assert next(stream)[0] == "a"  # the headers were checked before this
    path = tmp_path / SINGLE_FILE
    path.write_bytes(path.read_bytes()[: hf_tensor_locations(tmp_path)["b"].offset + 10])  # same inode, truncated
    with pytest.raises(HFCheckpointError, match=f"{path} is not a valid safetensors file \\(.*truncated while reading"):
        list(stream)


def test_load_pretrained_checks_keys_and_shapes(tmp_path: Path) -> None:
    source = _saved_by_hf(False, tmp_path / "src")
    state = load_hf_state_dict(source)
    config = Qwen3Config.from_pretrained(source)

    def write(name: str, tensors: dict[str, torch.Tensor], cfg: Qwen3Config = config) -> Path:
        save_hf_state_dict(tensors, tmp_path / name, config=cfg)
        return tmp_path / name

    bad_keys = {k: v for k, v in state.items() if k != "model.norm.weight"}
    bad_keys["model.layers.9.mlp.up_proj.weight"] = state["lm_head.weight"]
    expected = r"missing keys \['model.norm.weight'\].*unexpected keys \['model.layers.9.mlp.up_proj.weight'\]"
    with pytest.raises(HFCheckpointError, match=expected):
        load_pretrained(write("keys", bad_keys))

    wrong_shape = state | {"model.norm.weight": torch.ones(5)}
    with pytest.raises(HFCheckpointError, match=r"model.norm.weight has shape \(5,\).*expects \(32,\)"):
        load_pretrained(write("shape", wrong_shape))

    tied_config = Qwen3Config.from_hf_dict(config.to_hf_dict() | {"tie_word_embeddings": True})
    with pytest.raises(HFCheckpointError, match=r"ties word embeddings but lm_head\.weight differs"):
        load_pretrained(write("tied-differs", state, tied_config))
    equal_head = state | {"lm_head.weight": state["model.embed_tokens.weight"].clone()}
    tied = load_pretrained(write("tied-equal", equal_head, tied_config))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert torch.equal(tied.lm_head.weight, state["model.embed_tokens.weight"])

    (tmp_path / "no-config").mkdir()
    save_file(state, str(tmp_path / "no-config" / SINGLE_FILE))
    with pytest.raises(ValueError, match=r"config\.json not found"):
        load_pretrained(tmp_path / "no-config")
