"""builder/onnx_backend.py and builder/tensorrt_backend.py: the exported programs run by onnxruntime
give the eager engine's tokens in every mode (the tiny FP8 checkpoint; test_builder.py builds the
embedded fp32 one); the TensorRT graph and
builder calls up to TensorRT (a fake `tensorrt` module; onnx and onnxruntime are real)."""

from __future__ import annotations

import importlib.machinery
import json
import os
import re
import subprocess
import sys
import time
import types

import onnx
import pytest
import torch

from trimode.builder import onnx_backend, onnx_export, tensorrt_backend
from trimode.builder.program import PassShape, pass_shapes
from trimode.builder.settings import BuildSettings
from trimode.checkpoint import load_checkpoint
from trimode.decoding import DecodeConfig, Engine, EngineConfig, Mode, SamplingParams
from trimode.errors import EngineError, InputError, MissingDependencyError
from trimode.passes import PassKind, quadratic_chunk
from trimode.plugins.onnx_ops import DOMAIN, TENSORRT_ATTRS

from kv_pools import check_pool_writes, run_pass, twin_pools
from tolerance import forward_bound

BLOCK = 4
KV_BLOCK = 8  # a paged pool: 6 blocks per sequence, 18 in all (and the null block)
SETTINGS = BuildSettings(
    backend="onnx", max_batch_size=3, max_seq_len=48, max_input_len=16, block_lengths=(BLOCK,), kv_block_size=KV_BLOCK
)
ENGINE = EngineConfig(max_slots=3, max_seq_len=48, prefill_chunk=16, kv_block_size=KV_BLOCK)
PROMPTS = [
    [1, 17, 33, 250, 9],
    [1, 5, 9, 11, 200, 201, 7, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52],
    [1, 99],
]  # the second is prefilled in two chunks
NUM_NEW = 8
SHAPES = pass_shapes((BLOCK,), SETTINGS.max_seq_len)  # a quadratic program too: 20 positions fit 48


@pytest.fixture(scope="module")
def fp8_dir(tiny_deploy_dir):
    """The tiny checkpoint with its draft adapter, FP8-quantized by the shared tiny deploy."""
    return tiny_deploy_dir / "quantized"


@pytest.fixture(scope="module")
def engine(fp8_dir, tmp_path_factory):
    """(eager fp32 model, its ONNX backend, build() result, the engine dir) of the FP8 checkpoint."""
    model = load_checkpoint(fp8_dir, dtype=torch.float32).model
    out_dir = tmp_path_factory.mktemp("engine")
    seen = []
    start = time.perf_counter()
    info = onnx_backend.build(model, SHAPES, out_dir, SETTINGS, seen.append)
    print(f"\n{len(seen)} programs exported in {time.perf_counter() - start:.1f} s {info['export_s']}")
    assert seen == SHAPES
    return model, onnx_backend.load(out_dir, model, info), info, out_dir


@pytest.fixture(scope="module")
def plugin_engine(engine, tmp_path_factory):
    """(the same model, a backend over its plugin graphs: the graphs TensorRT consumes, in fp32, their
    BlockAttention nodes run by the torch reference): their CPU check."""
    model = engine[0]
    out_dir = tmp_path_factory.mktemp("plugin")
    files = {}
    with torch.no_grad():
        for shape in SHAPES:
            files[shape.name] = f"onnx/{shape.name}.onnx"
            onnx_export.export_pass(onnx_export.graph_model(model), shape, SETTINGS, out_dir / files[shape.name])
    manifest = {  # no "graph"
        "programs": files,
        "max_batch_size": 3,
        "max_seq_len": 48,
        "max_input_len": 16,
        "kv_block_size": KV_BLOCK,
        "num_kv_blocks": SETTINGS.pool_blocks,
    }
    backend = onnx_backend.load(out_dir, model, manifest)
    assert isinstance(backend, onnx_backend.PluginGraphBackend)
    return model, backend, manifest, out_dir


@pytest.fixture(params=["native", "plugin"])
def any_engine(request):
    """The onnx engine's native graphs, and the plugin graphs' CPU check: both keep the contract."""
    return request.getfixturevalue("engine" if request.param == "native" else "plugin_engine")


_generated: dict = {}


def generate(model, backend, mode: Mode, prompts) -> list[list[int]]:
    """The tokens of an engine over this backend (None: eager), once per case in this module."""
    key = (id(model), id(backend), mode, str(prompts))
    if key not in _generated:
        _generated[key] = _generate(model, backend, mode, prompts)
    return _generated[key]


def _generate(model, backend, mode: Mode, prompts) -> list[list[int]]:
    engine = Engine(model, ENGINE, backend=backend)
    seqs = [
        engine.add(
            p, SamplingParams(max_new_tokens=NUM_NEW, ignore_eos=True), DecodeConfig(mode=mode, block_length=BLOCK)
        )
        for p in prompts
    ]
    while engine.has_work:
        engine.step()
    return [s.tokens for s in seqs]


def test_build_writes_one_checked_native_program_per_shape(engine):
    model, _, info, out_dir = engine
    n = model.spec.num_hidden_layers
    assert info["files"] == [f"onnx/{s.name}.onnx" for s in SHAPES]
    assert info["graph"] == "native" and info["session"]["allow_spinning"] == 0
    assert set(info["versions"]) == {"onnx", "onnxruntime", "onnxruntime-extensions"}
    for shape in SHAPES:
        graph = onnx.load(str(out_dir / info["programs"][shape.name])).graph
        onnx.checker.check_model(str(out_dir / info["programs"][shape.name]))
        names = ["tokens", "tables", "lengths", "key_index"] + (["logit_index"] if shape.kind.last_logit_only else [])
        pool = [f"k_{i}" for i in range(n)] + [f"v_{i}" for i in range(n)]
        assert [i.name for i in graph.input] == names + pool
        # only the chunk's K/V come back, [b, L, Hkv, D]: the backend writes them into the pool
        assert [o.name for o in graph.output] == ["logits"] + [p.replace("_", "_new_") for p in pool]
        assert not [node for node in graph.node if node.domain not in ("", "ai.onnx")]  # onnxruntime runs it all
        assert {"GatherND", "Softmax"} <= {node.op_type for node in graph.node}
        dims = [d.dim_value or d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
        assert (
            isinstance(dims[0], str)
            and dims[1] == (shape.chunk or dims[1])
            and isinstance(dims[1], str) == (shape.chunk is None)
        )  # batch dynamic; length dynamic for prefill; a quadratic chunk W(W+1)
        assert isinstance(graph.input[3].type.tensor_type.shape.dim[0].dim_param, str)  # the span: dynamic
        tables = [d.dim_value or d.dim_param for d in graph.input[1].type.tensor_type.shape.dim]
        assert isinstance(tables[0], str) and tables[1] == 48 // KV_BLOCK  # batch dynamic, T static
        assert graph.input[-1].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert [d.dim_value for d in graph.input[-1].type.tensor_type.shape.dim] == [
            SETTINGS.pool_blocks + 1,  # and the null block
            model.spec.num_key_value_heads,
            KV_BLOCK,
            model.spec.head_dim,
        ]
        new_k = [d.dim_value or d.dim_param for d in graph.output[1].type.tensor_type.shape.dim]
        assert new_k[1:] == [shape.chunk or new_k[1], model.spec.num_key_value_heads, model.spec.head_dim]
        assert any(node.op_type == "QuantizeLinear" for node in graph.node)
        # FP8 weights stay float8 initializers behind DequantizeLinear
        assert any(t.data_type == onnx.TensorProto.FLOAT8E4M3FN and len(t.dims) == 2 for t in graph.initializer)


def test_plugin_graphs_keep_one_block_attention_node_per_layer(plugin_engine):
    model, _, manifest, out_dir = plugin_engine
    n = model.spec.num_hidden_layers
    for shape in SHAPES:
        graph = onnx.load(str(out_dir / manifest["programs"][shape.name])).graph
        pool = [f"k_{i}" for i in range(n)] + [f"v_{i}" for i in range(n)]
        assert [o.name for o in graph.output] == ["logits"] + [p.replace("_", "_out_") for p in pool]
        assert [node.op_type for node in graph.node if node.domain == DOMAIN] == ["BlockAttention"] * n


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("num_prompts", [1, 3])
def test_tokens_equal_the_eager_engine(any_engine, mode, num_prompts):
    model, backend, _, _ = any_engine
    prompts = PROMPTS[:num_prompts] if num_prompts > 1 else PROMPTS[1:2]
    expected = generate(model, None, mode, prompts)
    assert all(len(t) == NUM_NEW for t in expected)
    assert generate(model, backend, mode, prompts) == expected


@pytest.mark.parametrize("mode", [Mode.SELF_SPEC, Mode.QUADRATIC])
def test_self_speculation_equals_ar_on_the_onnx_backend(any_engine, mode):
    model, backend, _, _ = any_engine
    assert generate(model, backend, mode, PROMPTS) == generate(model, backend, Mode.AR, PROMPTS)


@pytest.mark.parametrize(
    "kind, length, slots",
    [
        (PassKind.VERIFY, BLOCK, [2, 0]),  # rows out of order: the pool is indexed, not viewed
        (PassKind.DENOISE, BLOCK, [0, 2]),  # a block pass, not causal
        (PassKind.DRAFT, BLOCK, [1]),
        (PassKind.DECODE, 1, [1, 2]),
        (PassKind.REFRESH, 3, [0, 1, 2]),  # the prefill program at another length, last logit only
        (PassKind.QUADRATIC, quadratic_chunk(BLOCK), [2, 0]),  # written whole at lengths + 0..C-1
    ],
)
def test_one_pass_writes_the_pool_like_eager(any_engine, kind, length, slots):
    """The backend contract on a paged pool, each slot's blocks shuffled: the eager model's logits on
    a dense pool with the same K/V, and the pool written exactly where the eager model writes it (the
    chunk at each row's length, through its table) and nowhere else."""
    model, backend, _, _ = any_engine
    dense, paged = twin_pools(model, 3, 48, KV_BLOCK, None, {0: 5, 1: 9, 2: 2}, seed=3)
    # seed 1: with seed 3 one K value of the one-row denoise sat on an e4m3 rounding boundary, and the
    # graph's summation order put it on the other code than eager's (logits 0.01 apart)
    tokens = torch.randint(5, model.spec.vocab_size, (len(slots), length), generator=torch.Generator().manual_seed(1))
    r = run_pass(model, backend, kind, tokens, slots, dense, paged)
    # onnxruntime's kernels sum in their own order
    torch.testing.assert_close(r.got, r.expected, atol=forward_bound(r.expected, model.spec, span=48), rtol=0)
    # K/V of deeper layers come through the earlier ones: the forward's bound covers them (fp8 codes: exact)
    is_fp8 = model.kv_dtype == torch.float8_e4m3fn
    check_pool_writes(r, slots, length, lambda e: 0.0 if is_fp8 else forward_bound(e, model.spec, span=48))


def test_native_backend_sees_what_else_wrote_the_pool(engine):
    """An FP8 KV pool is read through the backend's fp32 mirror: a write the backend did not make
    (here: a block copied in by hand) must reach the next pass, as it reaches the eager model."""
    model, backend, _, _ = engine
    assert model.kv_dtype == torch.float8_e4m3fn
    g = torch.Generator().manual_seed(5)
    eager_pool, onnx_pool = model.new_cache(3, 48, KV_BLOCK), model.new_cache(3, 48, KV_BLOCK)
    tables = torch.randperm(SETTINGS.pool_blocks, generator=g).view(3, -1)
    eager_pool.block_tables[:] = onnx_pool.block_tables[:] = tables
    eager_pool.lengths[:] = torch.tensor([6, 6, 6])
    tokens = torch.randint(5, model.spec.vocab_size, (2, BLOCK), generator=g)
    with torch.no_grad():  # a first pass on each: the backend's makes its mirror
        model(tokens, eager_pool, PassKind.DENOISE, torch.tensor([0, 1]))
    backend(PassKind.DENOISE, tokens, onnx_pool, [0, 1], [6, 6], None)
    block = int(tables[1, 0])  # slot 1's positions 0..7: its prefix, which the next pass reads
    for pool in (onnx_pool, eager_pool):
        for t in pool.k + pool.v:
            t[block] = torch.randint(-100, 100, t[block].shape, generator=torch.Generator().manual_seed(6)).to(t.dtype)
    with torch.no_grad():
        expected = model(tokens, eager_pool, PassKind.VERIFY, torch.tensor([1, 0]))
    got = backend(PassKind.VERIFY, tokens, onnx_pool, [1, 0], [6, 6], None)
    torch.testing.assert_close(got, expected, atol=forward_bound(expected, model.spec, span=48), rtol=0)


def test_backend_refuses_what_the_engine_was_not_built_for(any_engine):
    model, backend, _, _ = any_engine
    pool = model.new_cache(3, 48, KV_BLOCK)
    with pytest.raises(EngineError, match="no verify_8 program.*--block-lengths 8"):
        backend(PassKind.VERIFY, torch.ones(1, 8, dtype=torch.long), pool, [0], [0], None)
    with pytest.raises(EngineError, match="longer than this engine's max_input_len 16"):
        backend(PassKind.PREFILL, torch.ones(1, 17, dtype=torch.long), pool, [0], [0], None)
    with pytest.raises(InputError, match=r"is \(5, 2, 48, 16\); this engine was built for \(19, 2, 8, 16\)"):
        backend(PassKind.DECODE, torch.ones(1, 1, dtype=torch.long), model.new_cache(4, 48), [0], [0], None)


def test_missing_onnxruntime_names_the_extra(monkeypatch, tiny_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    model = load_checkpoint(tiny_dir, dtype=torch.float32).model
    with pytest.raises(MissingDependencyError, match=r"trimode\[onnx\]"):
        onnx_backend.build(model, SHAPES, tmp_path / "e", SETTINGS, lambda s: None)
    assert not (tmp_path / "e").exists()


# --- tensorrt ----------------------------------------------------------------------------------------

TRT_SETTINGS = BuildSettings(**{**SETTINGS.__dict__, "backend": "tensorrt", "onnx_only": True})
TRT_SHAPES = [PassShape(PassKind.PREFILL, None), PassShape(PassKind.DRAFT, BLOCK), PassShape(PassKind.QUADRATIC, BLOCK)]


@pytest.fixture(scope="module")
def onnx_only(fp8_dir, tmp_path_factory):
    """`--backend tensorrt --onnx-only` on the FP8 checkpoint (bf16 graphs, float8 pool)."""
    model = load_checkpoint(fp8_dir, dtype=torch.float32).model
    out_dir = tmp_path_factory.mktemp("trt") / "engine"
    seen = []
    info = tensorrt_backend.build(model, TRT_SHAPES, out_dir, TRT_SETTINGS, seen.append)
    assert seen == TRT_SHAPES
    return model, info, out_dir


def test_onnx_only_graph_has_reconciled_block_attention(onnx_only):
    model, info, out_dir = onnx_only
    n = model.spec.num_hidden_layers
    assert info["files"] == [
        "onnx/prefill_n.onnx",
        "onnx/draft_4.onnx",
        "onnx/quadratic_4.onnx",
        "tensorrt/report.json",
    ]
    assert info["engines"] == {} and "tensorrt" not in info["versions"]
    assert not list((out_dir / "tensorrt").glob("*.engine"))
    report = json.loads((out_dir / "tensorrt" / "report.json").read_text())
    for shape, is_causal, row_width in zip(TRT_SHAPES, (1, 0, 1), (0, 0, BLOCK)):
        graph = onnx.load(str(out_dir / f"onnx/{shape.name}.onnx")).graph
        types = {i.name: i.type.tensor_type.elem_type for i in graph.input}
        assert [o.name for o in graph.output] == ["logits"]  # the caches are in/out bindings
        assert all(types[f"{p}_{i}"] == onnx.TensorProto.FLOAT8E4M3FN for p in "kv" for i in range(n))
        nodes = [node for node in graph.node if node.domain == DOMAIN]
        assert len(nodes) == n
        for i, node in enumerate(nodes):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert node.op_type == "BlockAttention" and len(node.output) == 1
            assert list(node.input[3:5]) == [f"k_{i}", f"v_{i}"]
            assert {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()} == {
                **TENSORRT_ATTRS,
                "is_causal": is_causal,
                "row_width": row_width,
            }
            readers = [other for other in graph.node for name in other.input if name in (f"k_{i}", f"v_{i}")]
            assert readers == [node, node]  # the plugin writes them in place: nothing else reads them
        q_type = next(t for t in graph.value_info if t.name == nodes[0].input[0]).type.tensor_type.elem_type
        assert q_type == onnx.TensorProto.BFLOAT16
        assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in graph.node}
        assert report["programs"][shape.name]["plugins"] == ["BlockAttention"] * n
    assert report["programs"]["prefill_n"]["profile"]["tokens"] == [[1, 1], [3, 16], [3, 16]]
    assert report["programs"]["draft_4"]["profile"]["tokens"] == [[1, 4], [3, 4], [3, 4]]
    assert report["programs"]["quadratic_4"]["profile"]["tokens"] == [[1, 20], [3, 20], [3, 20]]


def test_tensorrt_without_tensorrt_writes_nothing(monkeypatch, tiny_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    model = load_checkpoint(tiny_dir, dtype=torch.float32).model
    settings = BuildSettings(**{**TRT_SETTINGS.__dict__, "onnx_only": False})
    with pytest.raises(MissingDependencyError, match=r"tensorrt >= 10.9.*--onnx-only.*trimode\[tensorrt\]"):
        tensorrt_backend.build(model, TRT_SHAPES, tmp_path / "e", settings, lambda s: None)
    assert not (tmp_path / "e").exists()


class FakeTensorRT:
    """What tensorrt_backend calls, recorded; its parser reads the graph with the real onnx."""

    __version__ = "10.13.0"

    def __init__(self):
        self.calls, self.plugins = [], []
        fake = self

        class Logger:
            WARNING = "warning"

            def __init__(self, severity):
                pass

        class Network:
            def __init__(self, flags):
                fake.calls.append(("create_network", flags))

        class Parser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                graph = onnx.load(path).graph  # the plugin contract: one output per BlockAttention
                fake.calls.append(
                    ("parse", os.path.basename(path), [len(n.output) for n in graph.node if n.domain == DOMAIN])
                )
                return True

        class Profile:
            def set_shape(self, name, low, opt, high):
                fake.calls.append(("profile", name, tuple(low), tuple(opt), tuple(high)))

        class TimingCache:
            def serialize(self):
                return b"timing"

        class Config:
            def create_timing_cache(self, data):
                return TimingCache()

            def set_timing_cache(self, cache, ignore_mismatch):
                fake.calls.append(("timing_cache", id(cache)))

            def add_optimization_profile(self, profile):
                fake.calls.append(("add_profile",))

            def set_flag(self, flag):
                fake.calls.append(("set_flag", flag))  # a strongly typed network must get none

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return Network(flags)

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build",))
                return b"engine"

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, Parser
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
        self.float32, self.float16, self.bfloat16, self.fp8, self.int64, self.uint8 = range(6)

    def plugin_module(self):
        def record(kind):
            def register(name):
                def decorate(fn):
                    self.plugins.append((kind, name))
                    return fn

                return decorate

            return register

        plugin = fake_module("tensorrt.plugin")
        plugin.register, plugin.aot_impl = record("register"), record("aot_impl")
        return plugin


def fake_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # torch._dynamo looks modules up by spec
    return module


def test_tensorrt_build_calls_with_a_fake_tensorrt(monkeypatch, tiny_dir, tmp_path):
    fake = FakeTensorRT()
    module = fake_module("tensorrt")
    module.__dict__.update(
        {
            k: getattr(fake, k)
            for k in (
                "__version__",
                "Logger",
                "Builder",
                "OnnxParser",
                "NetworkDefinitionCreationFlag",
                "float32",
                "float16",
                "bfloat16",
                "fp8",
                "int64",
                "uint8",
            )
        }
    )
    module.plugin = fake.plugin_module()
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", module.plugin)
    monkeypatch.setattr(tensorrt_backend, "has_cuda", lambda: True)  # the GPU check, not torch's
    model = load_checkpoint(tiny_dir, dtype=torch.float32).model
    settings = BuildSettings(**{**TRT_SETTINGS.__dict__, "onnx_only": False})
    seen = []
    shape = PassShape(PassKind.DECODE, 1)
    info = tensorrt_backend.build(model, [shape], tmp_path / "e", settings, seen.append)

    assert seen == [shape]
    assert {name for _, name in fake.plugins} == {
        f"trimode::{op}" for op in ("BlockAttention", "SpecAccept", "DiffusionCommit")
    }
    n = model.spec.num_hidden_layers
    assert fake.calls == [
        ("create_network", 1 << 5),
        ("parse", "decode_1.onnx", [1] * n),
        ("timing_cache", fake.calls[2][1]),
        ("profile", "tokens", (1, 1), (3, 1), (3, 1)),
        ("profile", "tables", (1, 6), (3, 6), (3, 6)),
        ("profile", "lengths", (1,), (3,), (3,)),
        ("add_profile",),
        ("build",),
    ]
    assert (tmp_path / "e/tensorrt/decode_1.engine").read_bytes() == b"engine"
    assert (tmp_path / "e/tensorrt/timing.cache").read_bytes() == b"timing"
    assert info["engines"] == {"decode_1": "tensorrt/decode_1.engine"} and info["versions"]["tensorrt"] == "10.13.0"
    assert info["pool_dtype"] == "torch.bfloat16"
    with pytest.raises(InputError, match="needs .* on CUDA"):  # the runner binds CUDA buffers only
        tensorrt_backend.TensorRTBackend({"decode_1": object()}, model, info)(
            PassKind.DECODE, torch.ones(1, 1, dtype=torch.long), model.new_cache(3, 48), [0], [0], None
        )


def test_aot_kernels_end_with_two_unread_scratch_pointers():
    """What the TensorRT launch must account for (tensorrt_backend's docstring): Triton >= 3.3
    appends global and profile scratch pointers after our arguments; the kernels never read them."""
    code = (
        "import json, torch; from trimode.plugins import tensorrt as t; "
        "k = t.block_attention_kernel(torch.bfloat16, torch.float8_e4m3fn, head_dim=128, group=4, page=16); "
        "print(json.dumps(dict(name=k.name, ptx=k.ptx)))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    kernel = json.loads(out.stdout)
    name, ptx = kernel["name"], kernel["ptx"]
    entry = re.search(rf"\.entry\s+{name}\s*\(([^)]*)\)", ptx)
    params = re.findall(r"\.param\s+\.(\w+)", entry.group(1))
    assert len(params) == 30 + 2 and params[-2:] == ["u64", "u64"]
    body = ptx[entry.end() :]
    assert f"{name}_param_29" in body  # the output pointer is read
    assert f"{name}_param_30" not in body and f"{name}_param_31" not in body


@pytest.mark.parametrize(
    "backend, section, onnx_only, expected",
    [
        ("onnx", {"graph": "native", "session": {"intra_op_num_threads": 1, "allow_spinning": 0}}, False, "native"),
        ("onnx", {}, False, "plugin graphs.*CPU check of TensorRT's graph"),  # built before the native graphs
        ("tensorrt", {}, True, "plugin graphs.*TensorRT's input: exported and checked"),
        ("tensorrt", {}, False, "plugin graphs.*built with our AOT plugins"),
        ("torch", {}, False, None),
    ],
)
def test_inspect_says_which_graph_an_engine_holds(backend, section, onnx_only, expected):
    from trimode.cli.engine import describe_graph

    got = describe_graph({"settings": {"backend": backend, "onnx_only": onnx_only}, "backend": section})
    assert got is None if expected is None else re.search(expected, got)
