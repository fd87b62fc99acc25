"""The `onnx` backend: the eager model exported per pass shape, run natively by onnxruntime.

One ONNX file per program (`program.pass_shapes`), `onnx/<shape.name>.onnx` in the engine dir: the
**native graph** (`NativePass`, manifest "graph": "native"), standard ONNX operators only:

  inputs   tokens       [b, L] int64       b dynamic 1..max_batch_size; L fixed, or 1..max_input_len (prefill)
           tables       [b, T] int64       the rows' block tables (the runner's slots'; kv_cache.py)
           lengths      [b] int64          their committed lengths
           key_index    [S] int64          0..S-1, S = max(lengths) (at least 1): the cached keys to read
           logit_index  [b] int64          prefill program only: the chunk index of each row's last logit
           k_0..k_(n-1), v_0..v_(n-1)      the pool, [num_kv_blocks + 1, Hkv, P, D] fp32 per layer
  outputs  logits       [b, L, V] fp32     ([b, 1, V] for the prefill program)
           k_new_i, v_new_i [b, L, Hkv, D] the chunk's K/V per layer (what the eager model writes)

Attention (`native_attention`) gathers the rows' cached keys 0..S-1 (position j at block
tables[:, j // P], offset j % P: one gather per tensor) and appends the chunk's own; the pattern is
computed from lengths and indices (cached key j visible iff j < length; chunk key i visible to query
q iff i <= q, always in a block pass, or as reference.quadratic_visibility says in a quadratic one:
onnx_export.chunk_visibility). The graph does not write the pool: the backend binds the pool tensors
as numpy views (onnxruntime reads them in place, no copy), and writes the chunk's K/V it gets back at
each row's length, through its table (the KV rule, store_cached for an FP8 KV pool; a quadratic
chunk's whole, as the eager model writes it). A pool the graph cannot read as it is (FP8 codes) is
read through an fp32 mirror of its values (code * scale, exactly what the eager model reads), updated
with each chunk and remade whole when something else wrote the pool. Sessions: intra-op threads =
torch.get_num_threads() when loaded, no spinning, sequential (`session_settings`, recorded in the manifest).

**Why (issue 27).** The first onnx backend exported the eager forward as it is: one
`trimode::BlockAttention` node per layer that takes and returns the whole layer's pool, run by its
torch reference as an onnxruntime-extensions Python op, and every layer's pool as graph inputs and
outputs. Profiled on the embedded checkpoint (4 layers, pool 8 x 512, 2 MiB per K or V tensor; 2-core
CPU, one thread): a decode pass took 600 ms (eager 5.7); the session ran 584 ms of it, of which the
four BlockAttention nodes 591 ms by onnxruntime's profiler (148 ms each) and all the other nodes
~2 ms; the reference math inside a node 0.43 ms, the backend's own pool conversion 0.03 ms. So the
time was the extension's marshalling of the pool into and out of each Python node (2 MiB in, 2 x 2 MiB
out per node), proportional to the pool's size. The native graph: decode 1.06 ms at batch 1 (eager
3.8), 2.4 at batch 8 (eager 6.3); an 8-token verify 2.2 / 8.2 ms (eager 5.7 / 16.4) on the same pool.

Both graphs are exported in onnx_export.py. **The plugin graph** (`export_pass`, `ExportedPass`) is the eager forward with one
`trimode::BlockAttention` node per layer (plugins/onnx_ops.py), the pool in and out: the graph
TensorRT consumes (tensorrt_backend.py). `PluginGraphBackend` runs it on CPU with the torch
references (its CPU check, tests/test_builder_onnx.py) and loads onnx engines built before the native
graphs (no "graph" in their manifest).

Precision: both graphs are fp32 here (onnxruntime's Python custom ops take fixed types and no numpy
type exists for bf16 or float8; the native graph follows for one oracle). A bf16 (or fp64) checkpoint
is exported as an fp32 copy. An FP8 checkpoint keeps its float8 weights: each FP8 linear exports as
standard FP8 Q/DQ (QuantizeLinear / DequantizeLinear with float8 zero points, the form TensorRT's
strongly typed networks read as FP8 GEMMs), which is the same math as fp8.FP8Linear.simulate. An
engine over an fp32 model gives the eager fp32 model's effect; over bf16 or fp64 models it is fp32
arithmetic, not bit-equal to them.
"""

from __future__ import annotations

import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from trimode.builder.onnx_export import GRAPH_DTYPE, export_native_pass, graph_model
from trimode.builder.program import PassShape, lookup
from trimode.builder.settings import BuildSettings
from trimode.errors import InputError, MissingDependencyError
from trimode.kv_cache import KVCache, position_index
from trimode.model import NLDModel
from trimode.passes import PassKind
from trimode.plugins.reference import load_cached, store_cached

if TYPE_CHECKING:
    import onnxruntime

ONNX_DIR = "onnx"
NATIVE = "native"  # the manifest's "graph" of this backend's engines (absent: plugin graphs, older builds)
MODEL_DTYPE = GRAPH_DTYPE  # an engine dir of this backend loads its checkpoint (the oracle) in the graph's dtype


def require(settings: BuildSettings) -> None:
    """What build_engine calls before anything is written: onnx and onnxruntime installed."""
    _import_onnx()


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
            export_native_pass(model, shape, settings, path)
        onnx.checker.check_model(str(path))  # by path: also valid past protobuf's 2 GB
        export_s[shape.name] = round(time.perf_counter() - start, 2)
        files.append(path.relative_to(out_dir).as_posix())
        on_program(shape)
    return {
        "files": files,
        "programs": {s.name: f for s, f in zip(shapes, files)},
        "graph": NATIVE,
        "dtype": "float32",
        "session": session_settings(),
        "max_batch_size": settings.max_batch_size,
        "max_seq_len": settings.max_seq_len,
        "max_input_len": settings.max_input_len,
        "kv_block_size": settings.kv_block_size,
        "num_kv_blocks": settings.pool_blocks,
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
    """The runner's backend (decoding/runner.py) over the native graphs, one session per program."""

    def __init__(self, sessions: dict, model: NLDModel, manifest: dict):
        self.sessions, self.max_input_len = sessions, manifest["max_input_len"]
        self.pool_shape = pool_shape(model, manifest)
        attns = [layer.self_attn for layer in model.encoder.layers]
        self.scales = [a.k_scale for a in attns] + [a.v_scale for a in attns]  # per pool tensor: k_0.., v_0..
        self.key_index = np.arange(manifest["max_seq_len"], dtype=np.int64)
        self.mirror: list[torch.Tensor] = []  # fp32 values of a pool the graph cannot read as it is (FP8 codes)
        self.mirror_of: list[tuple[weakref.ref, int]] = []  # (pool tensor, its _version when mirrored)

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
        _check_pool(pool, self.pool_shape)
        tables = pool.slot_tables(slots).cpu()
        feeds = {
            "tokens": tokens.cpu().long().numpy(),
            "tables": tables.numpy(),
            "lengths": np.asarray(lengths, dtype=np.int64),
            "key_index": self.key_index[: max(max(lengths), 1)],  # the cached keys to read: the longest row's
        }
        if kind.last_logit_only:
            feeds["logit_index"] = (
                np.full(b, L - 1, dtype=np.int64) if logit_index is None else logit_index.cpu().long().numpy()
            )
        tensors = pool.k + pool.v
        graph_pool = self.graph_pool(tensors)
        n = len(pool.k)
        for i in range(n):  # numpy views of the pool: onnxruntime reads them in place
            feeds[f"k_{i}"], feeds[f"v_{i}"] = graph_pool[i].numpy(), graph_pool[n + i].numpy()
        logits, *chunk = session.run(None, feeds)
        # the KV rule: the chunk's K/V at lengths[i] + 0..L-1 of each row, nothing else
        index = chunk_index(tables, torch.tensor(lengths), L, self.pool_shape[2])
        for i, (cache, new) in enumerate(zip(tensors, chunk)):
            stored = store_cached(torch.from_numpy(new), cache.dtype, self.scales[i])  # [b, L, Hkv, D]
            cache[index] = stored.to(cache.device)
            if graph_pool[i] is not cache:
                graph_pool[i][index] = load_cached(stored, GRAPH_DTYPE, self.scales[i]).float()
        self.mirror_of = [(weakref.ref(t), t._version) for t in tensors] if self.mirror else []
        return torch.from_numpy(logits).to(tokens.device)

    def graph_pool(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The pool as the graph reads it: its own tensors when they are CPU fp32 (no copy), else the
        fp32 mirror of their values (the codes times their scale for an FP8 KV pool), which every pass
        updates with the chunk it writes; the mirror is remade whole when it is of another pool or
        something else wrote the pool since the last pass (a tensor's _version counts its writes)."""
        if all(t.device.type == "cpu" and t.dtype == GRAPH_DTYPE and t.is_contiguous() for t in tensors):
            self.mirror, self.mirror_of = [], []
            return tensors
        is_current = len(self.mirror_of) == len(tensors) and all(
            ref() is t and version == t._version for (ref, version), t in zip(self.mirror_of, tensors)
        )
        if not is_current:
            self.mirror = [
                load_cached(t.cpu(), GRAPH_DTYPE, scale).to(GRAPH_DTYPE).contiguous()
                for t, scale in zip(tensors, self.scales)
            ]
        return self.mirror


class PluginGraphBackend:
    """A runner backend over the plugin graphs (`export_pass`: the graphs TensorRT consumes), their
    BlockAttention nodes run by the torch reference through onnxruntime-extensions: the CPU check of
    those graphs (tests/test_builder_onnx.py), and what loads an onnx engine built before the native
    graphs. Slow by design: each node's Python call gets and returns the whole pool (module docstring)."""

    def __init__(self, sessions: dict, model: NLDModel, manifest: dict):
        self.sessions, self.max_input_len = sessions, manifest["max_input_len"]
        self.pool_shape = pool_shape(model, manifest)
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
        _check_pool(pool, self.pool_shape)
        tables = pool.slot_tables(slots).cpu()
        starts = torch.tensor(lengths)
        feeds = {"tokens": tokens.cpu().long(), "tables": tables, "lengths": starts}
        if kind.last_logit_only:
            feeds["logit_index"] = torch.full((b,), L - 1) if logit_index is None else logit_index.cpu().long()
        for i, (k, v) in enumerate(zip(pool.k, pool.v)):
            feeds[f"k_{i}"] = _to_graph(k, self.k_scales[i])
            feeds[f"v_{i}"] = _to_graph(v, self.v_scales[i])
        logits, *caches = session.run(None, {name: x.numpy() for name, x in feeds.items()})
        # the eager effect: the chunk's K/V at lengths[i] + 0..L-1 of each row, nothing else
        index = chunk_index(tables, starts, L, self.pool_shape[2])
        n = len(pool.k)
        for i, cache in enumerate(pool.k + pool.v):
            scale = self.k_scales[i] if i < n else self.v_scales[i - n]
            cache[index] = store_cached(torch.from_numpy(caches[i])[index], cache.dtype, scale).to(
                cache.device, cache.dtype
            )
        return torch.from_numpy(logits).to(tokens.device)


def pool_shape(model: NLDModel, manifest: dict) -> tuple[int, int, int, int]:
    """[num_kv_blocks + 1, Hkv, P, D]: the pool of the engine's build (manifest: its backend section)."""
    block_size = min(manifest["kv_block_size"], manifest["max_seq_len"])
    return (manifest["num_kv_blocks"] + 1, model.spec.num_key_value_heads, block_size, model.spec.head_dim)


def chunk_index(tables: torch.Tensor, lengths: torch.Tensor, length: int, block_size: int) -> tuple:
    """The pool index of each row's chunk positions lengths .. lengths + length - 1 (kv_cache.position_index)."""
    return position_index(tables, lengths[:, None] + torch.arange(length), block_size)


def _check_pool(pool: KVCache, pool_shape: tuple[int, ...]) -> None:
    if tuple(pool.k[0].shape) != pool_shape:
        raise InputError(
            f"the KV pool is {tuple(pool.k[0].shape)}; this engine was built for {pool_shape} "
            "(num_kv_blocks + 1, kv heads, kv_block_size, head_dim)"
        )


def _to_graph(cache: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The pool tensor as the graph's fp32 (zero-copy for an fp32 CPU pool)."""
    return load_cached(cache.cpu(), GRAPH_DTYPE, scale).to(GRAPH_DTYPE).contiguous()


def session_settings() -> dict:
    """The onnxruntime settings of a native graph's session (recorded in the manifest): as many
    intra-op threads as torch uses (`--threads`, OMP_NUM_THREADS), no spinning (an idle worker
    that spins takes a core from the serving loop: ../shared/notes/stack.md), one graph at a time."""
    return {
        "intra_op_num_threads": "torch.get_num_threads() when loaded",
        "inter_op_num_threads": 1,
        "allow_spinning": 0,
        "execution_mode": "sequential",
        "graph_optimization_level": "all",
    }


def native_session_options() -> "onnxruntime.SessionOptions":
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def load(engine_dir: Path, model: NLDModel, manifest: dict) -> OnnxBackend | PluginGraphBackend:
    """manifest: the dict `build` returned (the engine manifest's backend section). An engine built
    before the native graphs (no "graph" entry) holds plugin graphs."""
    import onnxruntime

    from trimode.plugins.onnx_ops import session_options

    _import_onnx()
    is_native = manifest.get("graph") == NATIVE
    options = native_session_options() if is_native else session_options()
    sessions = {
        name: onnxruntime.InferenceSession(str(Path(engine_dir) / file), options, providers=["CPUExecutionProvider"])
        for name, file in manifest["programs"].items()
    }
    backend = OnnxBackend if is_native else PluginGraphBackend
    return backend(sessions, model, manifest)


def _import_onnx():
    try:
        import onnx
        import onnxruntime  # noqa: F401
        import onnxruntime_extensions  # noqa: F401
    except ImportError as err:
        raise MissingDependencyError(f"{err.name or 'onnx'}", "onnx") from err
    return onnx
