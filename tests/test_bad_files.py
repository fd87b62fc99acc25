"""Corrupt checkpoint files, generated systematically: every field of a safetensors header in turn
(weights, shards, the draft adapter), shard indexes, adapter configs, quantization configs. Each is
one `Error:` line naming the file (and the tensor), never a traceback, and nothing is written."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

DELETE = object()


def read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def write_st(path: Path, header, data: bytes, raw_header: bytes | None = None, size: int | None = None) -> None:
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if size is None else size) + raw + data)


def _by_offset(header: dict) -> list[str]:
    return sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])


# Each entry mutation: (label, function(entry, data_size) -> new entry or DELETE).
def _field(key, value):
    def mutate(entry, data_size):
        entry = dict(entry)
        if value is DELETE:
            entry.pop(key)
        else:
            entry[key] = value(entry, data_size) if callable(value) else value
        return entry

    return mutate


def _b(e):
    return e["data_offsets"][0]


def _e(e):
    return e["data_offsets"][1]


ENTRY_MUTATIONS = [
    ("dtype=F64", _field("dtype", "F64")),
    ("dtype=F32", _field("dtype", "F32")),
    ("dtype=Q4", _field("dtype", "Q4")),
    ("dtype=7", _field("dtype", 7)),
    ("dtype=null", _field("dtype", None)),
    ("no dtype", _field("dtype", DELETE)),
    ("shape=str", _field("shape", "x")),
    ("shape negative", _field("shape", lambda e, n: [-1, *e["shape"][1:]])),
    ("shape float", _field("shape", lambda e, n: [float(d) for d in e["shape"]])),
    ("shape bool", _field("shape", lambda e, n: [True, *e["shape"]])),
    ("shape scalar", _field("shape", [])),
    ("shape extra dim", _field("shape", lambda e, n: [*e["shape"], 2])),
    ("shape dim+1", _field("shape", lambda e, n: [e["shape"][0] + 1, *e["shape"][1:]])),
    ("shape overflow", _field("shape", [2**62, 2**62])),
    ("no shape", _field("shape", DELETE)),
    ("offsets one", _field("data_offsets", lambda e, n: [_b(e)])),
    ("offsets three", _field("data_offsets", lambda e, n: [_b(e), _e(e), _e(e)])),
    ("offsets str", _field("data_offsets", lambda e, n: [str(_b(e)), _e(e)])),
    ("offsets bool", _field("data_offsets", lambda e, n: [False, _e(e)])),
    ("offsets reversed", _field("data_offsets", lambda e, n: [_e(e), _b(e)])),
    ("offsets shifted", _field("data_offsets", lambda e, n: [_b(e) + 2, _e(e) + 2])),
    ("offsets short", _field("data_offsets", lambda e, n: [_b(e), _e(e) - 2])),
    ("offsets past end", _field("data_offsets", lambda e, n: [_b(e), n + 1000])),
    ("offsets negative", _field("data_offsets", lambda e, n: [-1, _e(e) - _b(e) - 1])),
    ("offsets huge", _field("data_offsets", lambda e, n: [2**62, 2**62 + _e(e) - _b(e)])),
    ("no offsets", _field("data_offsets", DELETE)),
    ("extra key", _field("extra", 1)),
    ("entry list", lambda e, n: []),
    ("entry str", lambda e, n: "x"),
    ("entry null", lambda e, n: None),
]


def _header_mutations(path: Path) -> list:
    """(label, apply(path)) for the whole file: header size, header text, truncation, trailing bytes."""

    def header_as(text: bytes):
        return lambda p: write_st(p, None, read_st(p)[1], raw_header=text)

    def with_size(size_of):
        def apply(p):
            header, data = read_st(p)
            raw = json.dumps(header).encode()
            write_st(p, header, data, raw_header=raw, size=size_of(len(raw), len(raw) + len(data) + 8))

        return apply

    def truncate(keep):
        return lambda p: p.write_bytes(p.read_bytes()[: keep(p.stat().st_size, read_st(p))])

    def edit(change):
        def apply(p):
            header, data = read_st(p)
            change(header)
            write_st(p, header, data)

        return apply

    return [
        ("header list", header_as(b"[]")),
        ("header number", header_as(b"3")),
        ("header garbage", header_as(b"\x00\x01\x02")),
        ("header not utf-8", header_as(b'{"\xff": 1}')),
        ("header nested", header_as(b"[" * 100_000)),
        ("metadata str", edit(lambda h: h.__setitem__("__metadata__", "x"))),
        ("metadata int value", edit(lambda h: h.__setitem__("__metadata__", {"format": 1}))),
        ("tensor dropped", edit(lambda h: h.pop(_by_offset(h)[1]))),
        ("size 0", with_size(lambda n, total: 0)),
        ("size 1", with_size(lambda n, total: 1)),
        ("size 2^62", with_size(lambda n, total: 2**62)),
        ("size 2^64-1", with_size(lambda n, total: 2**64 - 1)),
        ("size = file", with_size(lambda n, total: total)),
        ("size - 1", with_size(lambda n, total: n - 1)),
        ("size + 1", with_size(lambda n, total: n + 1)),
        ("empty file", truncate(lambda size, hd: 0)),
        ("4 bytes", truncate(lambda size, hd: 4)),
        ("8 bytes", truncate(lambda size, hd: 8)),
        ("mid header", truncate(lambda size, hd: 20)),
        ("mid data", truncate(lambda size, hd: size - len(hd[1]) // 2)),
        ("last byte cut", truncate(lambda size, hd: size - 1)),
        ("trailing byte", lambda p: p.write_bytes(p.read_bytes() + b"\x00")),
        ("trailing page", lambda p: p.write_bytes(p.read_bytes() + bytes(4096))),
        ("a directory", lambda p: (p.unlink(), p.mkdir())),
    ]


def _corrupt_entry(path: Path, which: int, mutate) -> str:
    header, data = read_st(path)
    name = _by_offset(header)[which]
    header[name] = mutate(header[name], len(data))
    write_st(path, header, data)
    return name


def _generate(ck) -> list:
    return ["generate", "--checkpoint", ck, "--max-new-tokens", 2, "hello"]


WHICH = {"first": 0, "last": -1}


@pytest.mark.parametrize("which", list(WHICH))
@pytest.mark.parametrize("label, mutate", ENTRY_MUTATIONS, ids=[m[0] for m in ENTRY_MUTATIONS])
def test_corrupt_weights_header_entry(refused, tiny_dir, tmp_path, label, mutate, which):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_dir, ck)
    name = _corrupt_entry(ck / "model.safetensors", WHICH[which], mutate)
    error = refused(_generate(ck), tmp_path, "model.safetensors").error
    assert repr(name) in error


@pytest.mark.parametrize("label, apply", _header_mutations(Path()), ids=[m[0] for m in _header_mutations(Path())])
@pytest.mark.parametrize("command", ["generate", "eval", "quantize"])
def test_corrupt_weights_file(refused, tiny_dir, tmp_path, label, apply, command):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_dir, ck)
    apply(ck / "model.safetensors")
    args = {
        "generate": _generate(ck),
        "eval": ["eval", ck, "--num-prompts", 1],
        "quantize": ["quantize", ck, "--out", tmp_path / "out", "--calib-data", ck / "config.json"],
    }[command]
    refused(args, tmp_path, "model.safetensors")


# --- sharded checkpoints: the index and each shard --------------------------------------------------
INDEX_VALUES = [
    "../model.safetensors",
    "/etc/passwd",
    "sub/model.safetensors",
    "missing.safetensors",
    3,
    None,
    "config.json",
    "linear_spec_lora/adapter_model.safetensors",
    "",
    ".safetensors",
]
INDEX_FILES = [b"{", b"[]", b"\xff", b"{}", b'{"weight_map": []}', b'{"weight_map": {}}', b'{"weight_map": "x"}']


@pytest.mark.parametrize("value", INDEX_VALUES)
def test_index_shard_names_stay_inside_the_checkpoint(refused, tiny_adapter_dir, tmp_path, value):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_adapter_dir, ck)
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = value
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    error = refused(_generate(ck), tmp_path, "model.safetensors.index.json").error
    assert repr(name) in error and "shard" in error


@pytest.mark.parametrize("content", INDEX_FILES, ids=repr)
def test_index_that_is_not_an_index(refused, tiny_adapter_dir, tmp_path, content):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_adapter_dir, ck)
    (ck / "model.safetensors.index.json").write_bytes(content)
    refused(_generate(ck), tmp_path, "model.safetensors.index.json")


def test_a_tensor_in_two_shards(refused, tiny_adapter_dir, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_adapter_dir, ck)
    shutil.copy(ck / "model-00001-of-00003.safetensors", ck / "model-00002-of-00003.safetensors")
    refused(_generate(ck), tmp_path, "is also in model-0000")


@pytest.mark.parametrize("case", ["moved to another shard", "in no shard"])
def test_a_tensor_missing_from_the_shard_its_index_names(refused, tiny_adapter_dir, tmp_path, case):
    """The index's weight_map is checked against the shards: each tensor is in the shard it names."""
    ck = tmp_path / "ck"
    shutil.copytree(tiny_adapter_dir, ck)
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    if case == "moved to another shard":  # the tensor is still loadable, from the wrong file
        name = next(iter(weight_map))
        shard = next(s for s in sorted(set(weight_map.values())) if s != weight_map[name])
    else:  # a name no shard holds and the model does not need
        name, shard = "encoder.extra.weight", next(iter(weight_map.values()))
    weight_map[name] = shard
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    error = refused(_generate(ck), tmp_path, shard).error
    assert repr(name) in error


@pytest.mark.parametrize("label, mutate", ENTRY_MUTATIONS[::3], ids=[m[0] for m in ENTRY_MUTATIONS[::3]])
def test_corrupt_shard(refused, tiny_adapter_dir, tmp_path, label, mutate):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_adapter_dir, ck)
    name = _corrupt_entry(ck / "model-00002-of-00003.safetensors", 0, mutate)
    error = refused(_generate(ck), tmp_path, "model-00002-of-00003.safetensors").error
    assert repr(name) in error or "shape" in error


# --- the draft adapter ------------------------------------------------------------------------------
ADAPTER_CONFIG = (
    [("r", v) for v in (0, -1, 1.5, "4", True, None, 8, 10**6, DELETE)]
    + [("lora_alpha", v) for v in (float("nan"), float("inf"), "16", None, True, DELETE)]
    + [("use_rslora", "yes"), ("use_rslora", 1), ("target_modules", ["q_proj"]), ("target_modules", 3)]
)


@pytest.mark.parametrize("key, value", ADAPTER_CONFIG, ids=lambda v: repr(v)[:20])
def test_corrupt_adapter_config(refused, tiny_adapter_dir, tmp_path, key, value):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_adapter_dir, ck)
    path = ck / "linear_spec_lora" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    if value is DELETE:
        cfg.pop(key)
    else:
        cfg[key] = value
    path.write_text(json.dumps(cfg))
    error = refused(_generate(ck), tmp_path, "linear_spec_lora/adapter_").error
    # r=8 parses but does not fit the factors: the error names the tensor and its shape instead
    assert f"'{key}'" in error or (key == "r" and "lora_A" in error and "shape" in error)


@pytest.mark.parametrize("content", [b"{", b"[]", b"\xff", None], ids=repr)
def test_adapter_config_that_is_not_one(refused, tiny_adapter_dir, tmp_path, content):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_adapter_dir, ck)
    path = ck / "linear_spec_lora" / "adapter_config.json"
    path.unlink()
    if content is not None:
        path.write_bytes(content)
    refused(_generate(ck), tmp_path, "adapter_config.json")


@pytest.mark.parametrize("label, mutate", ENTRY_MUTATIONS[::2], ids=[m[0] for m in ENTRY_MUTATIONS[::2]])
def test_corrupt_adapter_weights(refused, tiny_adapter_dir, tmp_path, label, mutate):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_adapter_dir, ck)
    name = _corrupt_entry(ck / "linear_spec_lora" / "adapter_model.safetensors", 0, mutate)
    error = refused(_generate(ck), tmp_path, "adapter_model.safetensors").error
    assert repr(name) in error or "lora_" in error


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_adapter_weights(refused, tiny_adapter_dir, tmp_path, value):
    """A NaN or inf in a LoRA factor is refused at load, naming the adapter file and the tensor."""
    from safetensors.torch import load_file, save_file

    ck = tmp_path / "ck"
    shutil.copytree(tiny_adapter_dir, ck)
    path = ck / "linear_spec_lora" / "adapter_model.safetensors"
    state = load_file(str(path))
    name = sorted(state)[-1]
    state[name][0, 0] = value
    save_file(state, str(path), metadata={"format": "pt"})
    error = refused(_generate(ck), tmp_path, "linear_spec_lora/adapter_model.safetensors").error
    assert repr(name) in error and "non-finite" in error


def test_adapter_weights_missing(refused, tiny_adapter_dir, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_adapter_dir, ck)
    (ck / "linear_spec_lora" / "adapter_model.safetensors").unlink()
    refused(_generate(ck), tmp_path, "no adapter_model.safetensors")


# --- the quantization config of an FP8 checkpoint ----------------------------------------------------
@pytest.mark.parametrize(
    "content, message",
    [
        (b"{", "not a ModelOpt quantization config"),
        (b"[]", "not a ModelOpt quantization config"),
        (b'{"quantization": []}', "'quantization'"),
        (b'{"quantization": {"quant_algo": "INT4"}}', "'quant_algo'"),
        (b'{"quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "INT8"}}', "'kv_cache_quant_algo'"),
        (b'{"quantization": {"quant_algo": "FP8"}}', "the weights are not float8"),
    ],
    ids=repr,
)
@pytest.mark.parametrize("command", ["generate", "quantize"])
def test_corrupt_quant_config(refused, tiny_dir, tmp_path, content, message, command):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_dir, ck)
    (ck / "hf_quant_config.json").write_bytes(content)
    args = (
        _generate(ck)
        if command == "generate"
        else ["quantize", ck, "--out", tmp_path / "out", "--calib-data", ck / "config.json"]
    )
    if command == "quantize" and "float8" in message:
        message = "already quantized"
    refused(args, tmp_path, message)
