"""The `onnx` backend: the eager forward exported per pass shape, run by onnxruntime.

One ONNX file per program (`program.pass_shapes`), `onnx/<shape.name>.onnx` in the engine dir:

  inputs   tokens       [b, L] int64       b dynamic 1..max_batch_size; L fixed, or 1..max_input_len (prefill)
           rows         [b] int64          the pool rows (the runner's slots)
           lengths      [b] int64          their committed lengths
           logit_index  [b] int64          prefill program only: the chunk index of each row's last logit
           k_0..k_(n-1), v_0..v_(n-1)      the pool, [max_batch_size, Hkv, max_seq_len, D] per layer (static)
  outputs  logits       [b, L, V] fp32     ([b, 1, V] for the prefill program)
           k_out_i, v_out_i                the pool with the chunk's K/V written (spec §4 KV rule)

The graph is the eager model's own forward (`NLDModel.forward`), so attention stays one
`trimode::BlockAttention` node per layer: the graph TensorRT consumes (tensorrt_backend.py).
onnxruntime runs those nodes with the torch references (plugins/onnx_ops.py).

Precision: onnxruntime's Python custom ops take fixed types and no numpy type exists for bf16 or
float8, so every graph is fp32. A bf16 (or fp64) checkpoint is exported as an fp32 copy. An FP8
checkpoint keeps its float8 weights: each FP8 linear exports as standard FP8 Q/DQ
(QuantizeLinear / DequantizeLinear with float8 zero points, the form TensorRT's strongly typed
networks read as FP8 GEMMs), which is the same math as fp8.FP8Linear.simulate. The backend converts the runner's pool to fp32 on the way in (float8 codes times their
scale) and writes the chunk back in the pool's own dtype, so an engine over an fp32 model gives the
eager fp32 model's effect; over bf16 or fp64 models it is fp32 arithmetic, not bit-equal to them.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trimode.builder.program import PassShape, lookup, quiet_export
from trimode.builder.settings import BuildSettings
from trimode.errors import InputError, MissingDependencyError
from trimode.fp8 import E4M3, FP8Linear
from trimode.kv_cache import KVCache
from trimode.model import NLDModel
from trimode.passes import PassKind
from trimode.plugins.reference import load_cached, store_cached

ONNX_DIR = "onnx"
GRAPH_DTYPE = torch.float32
MODEL_DTYPE = GRAPH_DTYPE  # an engine dir of this backend loads its checkpoint (the oracle) in the graph's dtype


class ExportedPass(nn.Module):
    """NLDModel.forward for one pass kind over the pool, with the graph's inputs and outputs."""

    def __init__(self, model: NLDModel, kind: PassKind):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, tokens, rows, lengths, logit_index, k: list[torch.Tensor], v: list[torch.Tensor]):
        # the model gathers each row's length from the pool's lengths: scatter ours there
        pool_lengths = torch.zeros(k[0].shape[0], dtype=torch.long).index_put((rows,), lengths)
        logits = self.model(tokens, KVCache(k, v, pool_lengths), self.kind, rows, logit_index)
        return (logits, *k, *v)  # the caches written in place: returning them makes the update an output


def require(settings: BuildSettings) -> None:
    """What build_engine calls before anything is written: onnx and onnxruntime installed."""
    _import_onnx()


def graph_names(num_layers: int, has_logit_index: bool) -> tuple[list[str], list[str]]:
    inputs = ["tokens", "rows", "lengths"] + (["logit_index"] if has_logit_index else [])
    pool = [f"k_{i}" for i in range(num_layers)] + [f"v_{i}" for i in range(num_layers)]
    return inputs + pool, ["logits"] + [name.replace("_", "_out_") for name in pool]


def export_pass(
    model: NLDModel, shape: PassShape, settings: BuildSettings, path: Path, pool_dtype: torch.dtype = GRAPH_DTYPE
) -> None:
    """Export one program of `model` (see graph_model) to `path`, the pool inputs in pool_dtype."""
    spec, B = model.spec, settings.max_batch_size
    # torch.export specialises dims of size 1: trace with 2 and allow the range the engine serves
    batch = torch.export.Dim("batch", min=1, max=max(2, B))
    L = shape.length or 2
    has_logit_index = shape.kind.last_logit_only
    cache = KVCache.allocate(spec, B, settings.max_seq_len, pool_dtype)
    b = min(2, B)
    token = spec.bos_token_id if spec.bos_token_id is not None else spec.mask_token_id  # any id traces
    args = (
        torch.full((b, L), token),
        torch.arange(b),
        torch.zeros(b, dtype=torch.long),
        torch.full((b,), L - 1) if has_logit_index else None,
        list(cache.k),
        list(cache.v),
    )
    length = torch.export.Dim("length", min=1, max=max(2, settings.max_input_len)) if shape.length is None else None
    dynamic = {
        "tokens": {0: batch, 1: length} if length else {0: batch},
        "rows": {0: batch},
        "lengths": {0: batch},
        "logit_index": {0: batch} if has_logit_index else None,
        "k": [None] * len(cache.k),
        "v": [None] * len(cache.v),
    }
    input_names, output_names = graph_names(spec.num_hidden_layers, has_logit_index)
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet_export():
        torch.onnx.export(
            ExportedPass(model, shape.kind).eval(),
            args,
            path,
            dynamo=True,
            dynamic_shapes=dynamic,
            input_names=input_names,
            output_names=output_names,
            verbose=False,
        )


class QdqLinear(nn.Module):
    """An FP8Linear that exports as Q/DQ nodes (its simulate() math: x rounded through E4M3 with
    input_scale, weights = codes * weight_scale, the GEMM in fp32); eager, it is simulate()."""

    def __init__(self, linear: FP8Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.onnx.is_in_onnx_export():
            return self.linear.simulate(x)
        fc, dtype = self.linear, x.dtype
        zero = torch.zeros((), dtype=E4M3)  # the float8 zero point sets the quantized type
        x = x.float()
        q = torch.onnx.ops.symbolic("QuantizeLinear", [x, fc.input_scale, zero], {}, dtype=E4M3, shape=x.shape)
        x = torch.onnx.ops.symbolic("DequantizeLinear", [q, fc.input_scale], {}, dtype=torch.float32, shape=x.shape)
        w = torch.onnx.ops.symbolic(
            "DequantizeLinear", [fc.weight, fc.weight_scale], {}, dtype=torch.float32, shape=fc.weight.shape
        )
        return F.linear(x, w).to(dtype)


def graph_model(model: NLDModel, dtype: torch.dtype = GRAPH_DTYPE) -> NLDModel:
    """The model to export: its weights in `dtype`, FP8 linears as Q/DQ (a copy, unless nothing
    changes). Buffers keep their dtype, as the loader leaves them: the fp32 RoPE frequencies and
    FP8 scales, the float8 weights."""
    has_fp8 = any(isinstance(m, FP8Linear) for m in model.modules())
    if model.dtype == dtype and not has_fp8:
        return model
    model = copy.deepcopy(model)
    for param in model.parameters():
        param.data = param.data.to(dtype)
    for name, linear in [(name, m) for name, m in model.named_modules() if isinstance(m, FP8Linear)]:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, QdqLinear(linear))
    return model


def build(
    model: NLDModel,
    shapes: list[PassShape],
    out_dir: Path,
    settings: BuildSettings,
    on_program: Callable[[PassShape], None],
) -> dict:
    """Export and check one ONNX file per shape under out_dir/onnx -> the manifest's backend section."""
    onnx = _import_onnx()
    model = graph_model(model.cpu() if model.device.type != "cpu" else model)
    files, export_s = [], {}
    for shape in shapes:
        path = Path(out_dir) / ONNX_DIR / f"{shape.name}.onnx"
        start = time.perf_counter()
        with torch.no_grad():
            export_pass(model, shape, settings, path)
        onnx.checker.check_model(str(path))  # by path: also valid past protobuf's 2 GB
        export_s[shape.name] = round(time.perf_counter() - start, 2)
        files.append(path.relative_to(out_dir).as_posix())
        on_program(shape)
    return {
        "files": files,
        "programs": {s.name: f for s, f in zip(shapes, files)},
        "dtype": "float32",
        "max_batch_size": settings.max_batch_size,
        "max_seq_len": settings.max_seq_len,
        "max_input_len": settings.max_input_len,
        "export_s": export_s,
        "versions": versions(),
    }


def versions() -> dict[str, str]:
    onnx = _import_onnx()
    import onnxruntime
    import onnxruntime_extensions

    return {
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime-extensions": onnxruntime_extensions.__version__,
    }


class OnnxBackend:
    """The runner's backend (decoding/runner.py) over one onnxruntime session per program."""

    def __init__(self, sessions: dict, model: NLDModel, max_batch_size: int, max_seq_len: int, max_input_len: int):
        self.sessions, self.max_input_len = sessions, max_input_len
        self.pool_shape = (max_batch_size, model.spec.num_key_value_heads, max_seq_len, model.spec.head_dim)
        attns = [layer.self_attn for layer in model.encoder.layers]
        self.k_scales, self.v_scales = [a.k_scale for a in attns], [a.v_scale for a in attns]

    def __call__(
        self,
        kind: PassKind,
        tokens: torch.Tensor,
        pool: KVCache,
        slots: list[int],
        lengths: list[int],
        logit_index: torch.Tensor | None,
    ) -> torch.Tensor:
        b, L = tokens.shape
        _, session = lookup(self.sessions, kind, L, self.max_input_len)
        if tuple(pool.k[0].shape) != self.pool_shape:
            raise InputError(
                f"the KV pool is {tuple(pool.k[0].shape)}; this engine was built for {self.pool_shape} "
                "(max_batch_size, kv heads, max_seq_len, head_dim)"
            )
        rows, starts = torch.tensor(slots), torch.tensor(lengths)
        feeds = {"tokens": tokens.cpu().long(), "rows": rows, "lengths": starts}
        if kind.last_logit_only:
            feeds["logit_index"] = torch.full((b,), L - 1) if logit_index is None else logit_index.cpu().long()
        for i, (k, v) in enumerate(zip(pool.k, pool.v)):
            feeds[f"k_{i}"] = _to_graph(k, self.k_scales[i])
            feeds[f"v_{i}"] = _to_graph(v, self.v_scales[i])
        logits, *caches = session.run(None, {name: x.numpy() for name, x in feeds.items()})
        # the eager effect: the chunk's K/V at lengths[i] + 0..L-1 of each row, nothing else
        index = (rows[:, None], slice(None), starts[:, None] + torch.arange(L))
        n = len(pool.k)
        for i, cache in enumerate(pool.k + pool.v):
            scale = self.k_scales[i] if i < n else self.v_scales[i - n]
            cache[index] = store_cached(torch.from_numpy(caches[i])[index], cache.dtype, scale).to(
                cache.device, cache.dtype
            )
        return torch.from_numpy(logits).to(tokens.device)


def _to_graph(cache: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The pool tensor as the graph's fp32 (zero-copy for an fp32 CPU pool)."""
    return load_cached(cache.cpu(), GRAPH_DTYPE, scale).to(GRAPH_DTYPE).contiguous()


def load(engine_dir: Path, model: NLDModel, manifest: dict) -> OnnxBackend:
    """manifest: the dict `build` returned (the engine manifest's backend section)."""
    import onnxruntime

    from trimode.plugins.onnx_ops import session_options

    _import_onnx()
    options = session_options()
    sessions = {
        name: onnxruntime.InferenceSession(str(Path(engine_dir) / file), options, providers=["CPUExecutionProvider"])
        for name, file in manifest["programs"].items()
    }
    return OnnxBackend(sessions, model, manifest["max_batch_size"], manifest["max_seq_len"], manifest["max_input_len"])


def _import_onnx():
    try:
        import onnx
        import onnxruntime  # noqa: F401
        import onnxruntime_extensions  # noqa: F401
    except ImportError as err:
        raise MissingDependencyError(f"{err.name or 'onnx'}", "onnx") from err
    return onnx
