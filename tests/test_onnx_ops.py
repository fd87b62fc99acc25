"""plugins/onnx_ops.py: each op exports (dynamo) to one trimode node that onnxruntime runs like the reference."""

from __future__ import annotations

import sys

import onnx
import onnxruntime
import pytest
import torch
from torch import nn

from trimode.checkpoint import load_checkpoint
from trimode.errors import MissingDependencyError
from trimode.kv_cache import KVCache
from trimode.passes import PassKind
from trimode.plugins import ops, reference
from trimode.plugins.onnx_ops import DOMAIN, session_options
from trimode.plugins.reference import ChunkLayout

from tolerance import attention_accumulations, bound, forward_bound

pytestmark = pytest.mark.numerics  # rerun on another CPU kernel path (Makefile)

MASK = 2
HEAD_DIM = 8
TENSORRT = {"plugin_namespace": "trimode", "plugin_version": "1", "aot": 1}


class BlockAttention(nn.Module):
    def __init__(self, is_causal: bool, row_width: int = 0):
        super().__init__()
        self.is_causal, self.row_width = is_causal, row_width

    def forward(self, q, k, v, k_cache, v_cache, lengths, tables=None, k_scale=None, v_scale=None):
        layout = ChunkLayout.build(lengths, tables, q.shape[1], self.is_causal, None, None, self.row_width)
        out = ops.block_attention(q, k, v, k_cache, v_cache, layout, k_scale, v_scale)
        return out, k_cache, v_cache


class SpecAccept(nn.Module):
    """Per-row temperature [b] and seed [b] are graph inputs."""

    def forward(self, verify_logits, draft, eos_ids, temperature, seed):
        return tuple(ops.spec_accept(verify_logits, draft, MASK, eos_ids, temperature, seed))


class ScalarSpecAccept(nn.Module):
    """The decoders' transition form: one Python float / int for every row."""

    def __init__(self, temperature: float, seed: int):
        super().__init__()
        self.temperature, self.seed = temperature, seed

    def forward(self, verify_logits, draft, eos_ids):
        return tuple(ops.spec_accept(verify_logits, draft, MASK, eos_ids, self.temperature, self.seed))


class DiffusionCommit(nn.Module):
    def __init__(self, threshold: float | None):
        super().__init__()
        self.threshold = threshold

    def forward(self, logits, block, temperature, seed, num_commit=None):
        return ops.diffusion_commit(logits, block, MASK, self.threshold, num_commit, temperature, seed)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """export(key, module, args, dynamic_shapes) -> ONNX model; once per key, since attributes are
    baked in (every shape is dynamic, so one graph serves many cases)."""
    models = {}

    def export(key: str, module: nn.Module, args: tuple, dynamic_shapes: tuple | None) -> onnx.ModelProto:
        if key not in models:
            path = tmp_path_factory.mktemp("onnx") / f"{key}.onnx"
            torch.onnx.export(module.eval(), args, path, dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False)
            models[key] = onnx.load(path)
        return models[key]

    return export


def only_node(model: onnx.ModelProto, op_type: str) -> tuple[onnx.NodeProto, dict]:
    nodes = [n for n in model.graph.node if n.domain == DOMAIN]
    assert [n.op_type for n in nodes] == [op_type]
    assert any(o.domain == DOMAIN and o.version == 1 for o in model.opset_import)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    return nodes[0], {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}


def run(model: onnx.ModelProto, args: tuple) -> list[torch.Tensor]:
    session = onnxruntime.InferenceSession(model.SerializeToString(), session_options())
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), args)}
    assert len(feeds) == len(session.get_inputs())
    return [torch.from_numpy(y) for y in session.run(None, feeds)]


def test_missing_stack_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)  # import fails
    with pytest.raises(MissingDependencyError, match=r"trimode\[onnx\]"):
        session_options()


# --- BlockAttention ----------------------------------------------------------------------------------


def attention_inputs(b, L, H, Hkv, num_blocks, page=16, dtype=torch.float32):
    """q, k, v and caches [num_blocks, Hkv, page, D] (a dense cache: one block of page positions per row)."""
    g = torch.Generator().manual_seed(b * 100 + L * 10 + H + Hkv)
    q = torch.randn(b, L, H, HEAD_DIM, generator=g)
    k, v = (torch.randn(b, L, Hkv, HEAD_DIM, generator=g) for _ in range(2))
    k_cache, v_cache = (torch.randn(num_blocks, Hkv, page, HEAD_DIM, generator=g).to(dtype) for _ in range(2))
    return q, k, v, k_cache, v_cache


def paged_tables(lengths: list[int], L: int, page: int, seed: int = 0) -> tuple[torch.Tensor, int]:
    """Tables [b, T] over shuffled blocks, each row padded with the null block (the last one) -> (tables, N)."""
    needed = [-(-(n + L) // page) for n in lengths]
    null = sum(needed) + 1  # one spare block that no row holds
    order = torch.randperm(null, generator=torch.Generator().manual_seed(seed)).tolist()
    tables = torch.full((len(lengths), max(needed) + 1), null)
    for i, n in enumerate(needed):
        tables[i, :n], order = torch.tensor(order[:n]), order[n:]
    return tables, null + 1


def attention_model(exported, is_causal: bool, with_tables: bool, row_width: int = 0):
    """One graph per pattern, for every shape; with_tables: the tables are an input (exported paged:
    tables over blocks of 4), otherwise the graph makes the dense [[0], [1], ..]. row_width W: a
    quadratic chunk (exported with its W(W+1) tokens)."""
    L = row_width * (row_width + 1) or 3
    tables, num_blocks = paged_tables([4, 1], L, 4) if with_tables else (None, 2)
    q, k, v, k_cache, v_cache = attention_inputs(2, L, 10, 5, num_blocks, page=4 if with_tables else 16)
    args = (q, k, v, k_cache, v_cache, torch.tensor([4, 1]))
    shapes = (
        {0: "b", 1: "L", 2: "H"},
        {0: "b", 1: "L", 2: "Hkv"},
        {0: "b", 1: "L", 2: "Hkv"},
        {0: "N", 1: "Hkv", 2: "P"},
        {0: "N", 1: "Hkv", 2: "P"},
        {0: "b"},
    )
    if with_tables:
        args, shapes = args + (tables,), shapes + ({0: "b", 1: "T"},)
    key = f"attention-{is_causal}-{with_tables}-{row_width}"
    return exported(key, BlockAttention(is_causal, row_width), args, shapes)


@pytest.mark.parametrize(
    "is_causal, tables, page, lengths, L, H, Hkv, W",
    [
        (True, None, 16, [3, 0], 4, 4, 2, 0),  # ragged with an empty prefix, GQA 2:1
        (True, None, 16, [5, 2], 1, 4, 1, 0),  # one token, GQA 4:1
        (True, None, 16, [2, 2], 4, 2, 2, 0),  # equal prefixes, no GQA
        (False, [[2], [0]], 16, [0, 3], 4, 4, 1, 0),  # block pattern on a dense cache's rows 2 and 0 of 3
        (False, [[1], [2]], 16, [6, 6], 1, 4, 2, 0),
        (True, "paged", 4, [5, 0], 4, 4, 2, 0),  # shuffled blocks of 4, tables padded with the null block
        (False, "paged", 4, [9, 3, 2], 3, 4, 1, 0),
        (True, "paged", 2, [6, 1], 1, 2, 2, 0),  # AR decode over blocks of 2
        (True, None, 16, [3, 0], 6, 4, 2, 2),  # quadratic (W 2: 6 tokens), ragged with an empty prefix
        (True, "paged", 4, [5, 0, 9], 12, 4, 1, 3),  # quadratic on shuffled blocks, GQA 4:1
        (True, "paged", 2, [6, 1], 20, 2, 2, 4),
    ],
)
def test_block_attention(exported, is_causal, tables, page, lengths, L, H, Hkv, W):
    model = attention_model(exported, is_causal, tables is not None, W)
    if tables == "paged":
        tables, num_blocks = paged_tables(lengths, L, page, seed=len(lengths))
    else:
        tables, num_blocks = (None, len(lengths)) if tables is None else (torch.tensor(tables), 3)
    q, k, v, k_cache, v_cache = attention_inputs(len(lengths), L, H, Hkv, num_blocks, page)
    lengths = torch.tensor(lengths)
    args = (q, k, v, k_cache, v_cache, lengths) + (() if tables is None else (tables,))

    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    layout = ChunkLayout.build(lengths, tables, L, is_causal, None, None, W)
    expected = reference.block_attention(q, k, v, expected_k, expected_v, layout)
    out, k_out, v_out = run(model, args)

    # onnxruntime runs the node's torch reference, our expected value is the reference again: other shapes, other order
    capacity = page * (1 if tables is None else tables.shape[1])
    atol = bound(expected, attention_accumulations(q.shape[-1], capacity + L))
    torch.testing.assert_close(out, expected, atol=atol, rtol=0)
    assert torch.equal(k_out, expected_k) and torch.equal(v_out, expected_v)
    assert not torch.equal(k_out, k_cache)  # the chunk's K was written

    node, attrs = only_node(model, "BlockAttention")
    assert attrs == {**TENSORRT, "is_causal": int(is_causal), "row_width": W}
    assert len(node.input) == 9 and len(node.output) == 3
    if tables is not None:
        assert node.input[6] == "tables"  # the layout's block tables, straight from the graph input
    # the caches the module returns are the node's updated caches
    assert [o.name for o in model.graph.output] == list(node.output)


def test_block_attention_fp8_cache_graph(exported):
    """FP8 codes cannot reach a Python op (no numpy float8): check the graph TensorRT would get."""
    tables, num_blocks = paged_tables([4, 1], 3, 4)
    q, k, v, k_cache, v_cache = attention_inputs(2, 3, 10, 5, num_blocks, page=4, dtype=torch.float8_e4m3fn)
    args = (q, k, v, k_cache, v_cache, torch.tensor([4, 1]), tables, torch.tensor(0.5), torch.tensor(0.25))
    model = exported("attention-fp8", BlockAttention(True), args, None)

    node, attrs = only_node(model, "BlockAttention")
    assert attrs == {**TENSORRT, "is_causal": 1, "row_width": 0}
    assert list(node.input[6:]) == ["tables", "k_scale", "v_scale"]
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
    assert types["k_cache"] == types[node.output[1]] == onnx.TensorProto.FLOAT8E4M3FN
    assert types["tables"] == onnx.TensorProto.INT64
    assert types[node.output[0]] == onnx.TensorProto.FLOAT


# --- SpecAccept --------------------------------------------------------------------------------------

ACCEPT_SHAPES = ({0: "b", 1: "L", 2: "V"}, {0: "b", 1: "L"}, {0: "E"}, {0: "b"}, {0: "b"})
ACCEPT_EXAMPLE = (
    torch.tensor([[1, 3, 4]] * 2),
    torch.tensor([6, 7, 8, 9]),
    torch.tensor([0.5, 0.0]),
    torch.tensor([1, 2]),
)


def accept_model(exported) -> onnx.ModelProto:
    """One graph for every sampling setting: temperature and seed are its inputs."""
    draft, eos, temperature, seed = ACCEPT_EXAMPLE
    return exported(
        "accept", SpecAccept(), (verify_logits([[1, 3, 4]] * 2, 8.0), draft, eos, temperature, seed), ACCEPT_SHAPES
    )


def verify_logits(tokens: list[list[int]], peak: float, vocab: int = 11) -> torch.Tensor:
    """Noise with `peak` at the given tokens, and the mask token above them (never picked)."""
    g = torch.Generator().manual_seed(len(tokens[0]))
    logits = torch.randn(len(tokens), len(tokens[0]), vocab, generator=g)
    logits[..., MASK] = peak + 1
    return logits.scatter(-1, torch.tensor(tokens)[..., None], peak)


@pytest.mark.parametrize(
    "temperature, seed, verify, draft, eos",
    [
        ([0.0, 0.0], [0, 0], [[3, 4, 5, 6], [3, 9, 5, 6]], [[1, 3, 4, 5], [1, 3, 4, 5]], [6]),  # EOS emitted / not
        ([0.0, 0.0], [0, 0], [[3, 4, 6, 7], [7, 4, 5, 6]], [[1, 3, 4, 6], [1, 7, 4, 5]], [6, 9]),
        ([0.0, 0.0], [0, 0], [[7], [1]], [[1], [1]], []),  # L = 1, no EOS ids
        ([0.8, 0.8], [1234, 2**50], [[3, 4, 5, 6], [3, 9, 5, 6]], [[1, 3, 4, 5], [1, 3, 4, 5]], [6]),  # Gumbel-max
        ([0.0, 0.8], [7, 1234], [[3, 4, 5, 6], [3, 9, 5, 6]], [[1, 3, 4, 5], [1, 3, 4, 5]], [6]),  # greedy + sampled
        ([0.8, 0.0, 1.5], [5, 6, 5], [[3, 4, 5, 6], [3, 9, 5, 6], [3, 4, 5, 6]], [[1, 3, 4, 5]] * 3, [6]),  # b = 3
    ],
)
def test_spec_accept(exported, temperature, seed, verify, draft, eos):
    model = accept_model(exported)
    is_sampled = [t > 0 for t in temperature]
    # sampled rows get low peaks (the noise shows), greedy rows high ones
    logits = torch.where(
        torch.tensor(is_sampled)[:, None, None], verify_logits(verify, 1.0), verify_logits(verify, 8.0)
    )
    temperature, seed = torch.tensor(temperature), torch.tensor(seed)
    args = (logits, torch.tensor(draft), torch.tensor(eos, dtype=torch.int64), temperature, seed)

    expected = reference.spec_accept(*args[:2], MASK, *args[2:])
    got = run(model, args)
    assert [x.dtype for x in got] == [torch.int64, torch.int64, torch.int64, torch.bool]
    for name, x, y in zip(expected._fields, got, expected):
        assert torch.equal(x, y), name
    for row, sampled in enumerate(is_sampled):
        if not sampled:  # greedy rows: the peaks
            assert got[0][row].tolist() == verify[row]
    if any(is_sampled):  # the case is sensitive to the seeds
        assert not torch.equal(got[0], reference.spec_accept(*args[:2], MASK, args[2], temperature, seed + 1)[0])

    node, attrs = only_node(model, "SpecAccept")
    assert len(node.input) == 6 and len(node.output) == 4  # + the zeroed counters the kernel needs
    assert list(node.input[3:5]) == ["temperature", "seed"]  # runtime inputs, not attributes
    assert attrs == {**TENSORRT, "mask_token_id": MASK}


def test_spec_accept_eos_prefix(exported):
    """The first table row, spelled out: row 0 emits its EOS, row 1 stops before it."""
    tokens, n, next_seed, is_eos = run(
        accept_model(exported),
        (
            verify_logits([[3, 4, 5, 6], [3, 9, 5, 6]], 8.0),
            torch.tensor([[1, 3, 4, 5], [1, 3, 4, 5]]),
            torch.tensor([6]),
            torch.zeros(2),
            torch.zeros(2, dtype=torch.int64),
        ),
    )
    assert n.tolist() == [4, 2] and next_seed.tolist() == [6, 9] and is_eos.tolist() == [True, False]


@pytest.mark.parametrize("temperature, seed", [(0.0, 0), (0.8, 1234)])
def test_spec_accept_python_scalars_become_row_inputs(exported, temperature, seed):
    """A Python float / int (the decoders today) exports as [b] tensors made in the graph: the node
    still takes them as inputs, and every row gets the value."""
    draft, eos, _, _ = ACCEPT_EXAMPLE
    model = exported(
        f"accept-scalar-{temperature}",
        ScalarSpecAccept(temperature, seed),
        (verify_logits([[1, 3, 4]] * 2, 8.0), draft, eos),
        ACCEPT_SHAPES[:3],
    )
    args = (
        verify_logits([[3, 4, 5, 6], [3, 9, 5, 6], [3, 4, 5, 6]], 1.0),
        torch.tensor([[1, 3, 4, 5]] * 3),
        torch.tensor([6]),
    )
    got = run(model, args)
    expected = reference.spec_accept(*args[:2], MASK, args[2], torch.full((3,), temperature), torch.full((3,), seed))
    for name, x, y in zip(expected._fields, got, expected):
        assert torch.equal(x, y), name
    node, attrs = only_node(model, "SpecAccept")
    assert len(node.input) == 6 and attrs == {**TENSORRT, "mask_token_id": MASK}
    assert not {"temperature", "seed"} & {i.name for i in model.graph.input}


# --- DiffusionCommit ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "threshold, num_commit, temperature, seed, scale",
    [
        (0.9, None, [0.0, 0.0], [0, 0], 10.0),
        (None, [1, 3], [0.0, 0.0], [0, 0], 4.0),
        (None, [4, 6], [0.7, 0.7], [99, 2**45], 1.0),  # every masked position commits: the sampled candidates show
        (None, [4, 6], [0.0, 1.2], [99, 3], 1.0),  # a greedy and a sampled row
    ],
)
def test_diffusion_commit(exported, threshold, num_commit, temperature, seed, scale):
    g = torch.Generator().manual_seed(7)
    example = (
        torch.randn(2, 3, 11, generator=g),
        torch.full((2, 3), MASK),
        torch.tensor([0.5, 0.0]),
        torch.tensor([1, 2]),
    )
    shapes = ({0: "b", 1: "L", 2: "V"}, {0: "b", 1: "L"}, {0: "b"}, {0: "b"})
    if num_commit is not None:
        example, shapes = example + (torch.tensor([1, 2]),), shapes + ({0: "b"},)
    model = exported(f"commit-{threshold}", DiffusionCommit(threshold), example, shapes)

    logits = torch.randn(2, 6, 13, generator=g) * scale
    logits[:, 0, MASK] = 30.0  # the mask token is never a candidate
    block = torch.tensor([[MASK, 5, MASK, MASK, 1, MASK], [MASK] * 6])
    temperature, seed = torch.tensor(temperature), torch.tensor(seed)
    num_commit = None if num_commit is None else torch.tensor(num_commit)
    args = (logits, block, temperature, seed) + (() if num_commit is None else (num_commit,))
    expected = reference.diffusion_commit(logits, block, MASK, threshold, num_commit, temperature, seed)
    (got,) = run(model, args)
    assert torch.equal(got, expected)
    if threshold is not None:  # the threshold commits more than the one most confident position
        assert ((got != block).sum(dim=1) > 1).any()
    if (temperature > 0).any():
        assert not torch.equal(
            got, reference.diffusion_commit(logits, block, MASK, None, num_commit, temperature, seed + 1)
        )
    greedy = reference.diffusion_commit(logits, block, MASK, threshold, num_commit, 0.0, 0)
    for row in range(2):  # greedy rows commit the argmax, sampled rows (here) something else
        assert torch.equal(got[row], greedy[row]) == bool(temperature[row] == 0)

    node, attrs = only_node(model, "DiffusionCommit")
    assert len(node.input) == 6 and len(node.output) == 2  # + the zeroed counters; + the confidences
    assert list(node.input[3:5]) == ["temperature", "seed"]
    assert attrs == {
        **TENSORRT,
        "mask_token_id": MASK,
        "threshold": pytest.approx(threshold or 0.0),
        "use_threshold": int(threshold is not None),
    }


# --- the whole forward -------------------------------------------------------------------------------


class CausalForward(nn.Module):
    """NLDModel.forward over a KV cache given as [layers, ...] tensors (the pool's per-layer tensors
    stacked); returns the caches so their update is an output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens, k, v, lengths):
        tables = torch.arange(lengths.shape[0], device=lengths.device)[:, None]  # dense: slot i in block i
        cache = KVCache(list(k.unbind(0)), list(v.unbind(0)), lengths, tables)
        return self.model(tokens, cache, PassKind.VERIFY), k, v


def test_model_forward(tiny_dir, tmp_path):
    model = load_checkpoint(tiny_dir, dtype=torch.float32).model.eval()
    cache = model.new_cache(3, 24)
    for i, (k, v) in enumerate(zip(cache.k, cache.v)):
        k.normal_(generator=torch.Generator().manual_seed(i))
        v.normal_(generator=torch.Generator().manual_seed(100 + i))
    cache.lengths[:] = torch.tensor([5, 0, 3])
    tokens = torch.randint(5, model.spec.vocab_size, (3, 4), generator=torch.Generator().manual_seed(2))
    args = (tokens, torch.stack(cache.k), torch.stack(cache.v), cache.lengths.clone())
    path = tmp_path / "forward.onnx"
    torch.onnx.export(
        CausalForward(model),
        args,
        path,
        dynamo=True,
        verbose=False,
        dynamic_shapes=({0: "b", 1: "L"}, {1: "N", 3: "S"}, {1: "N", 3: "S"}, {0: "b"}),
    )

    onnx_model = onnx.load(path)
    assert [n.op_type for n in onnx_model.graph.node if n.domain == DOMAIN] == ["BlockAttention"] * 2
    logits, k, v = run(onnx_model, args)
    with torch.no_grad():
        expected = model(tokens, cache, PassKind.VERIFY)
    # onnxruntime's GEMMs and the node sum in their own order; K/V of layer 2 come through layer 1
    for got, want in ((logits, expected), (k, torch.stack(cache.k)), (v, torch.stack(cache.v))):
        torch.testing.assert_close(got, want, atol=forward_bound(want, model.spec, span=24), rtol=0)
