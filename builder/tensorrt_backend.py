"""The `tensorrt` backend: the plugin graphs (onnx_export.export_pass), reconciled with our AOT plugins, built into
one serialized engine per pass shape (`tensorrt/<shape.name>.engine`), and a runner over them.

**The BlockAttention node vs the plugin.** ONNX is functional, so the exported node returns
(out, k_cache_out, v_cache_out); the TensorRT plugin (plugins/tensorrt.py) writes the chunk's K/V
into its cache inputs and has one output. The graph TensorRT parses is a rewritten copy
(`trt_graph`): each BlockAttention node keeps only `out`, the k_out_i / v_out_i graph outputs go,
and the pool tensors k_i / v_i stay inputs that the runner binds to the pool's own CUDA memory, so
they are in/out bindings: the plugin writes them in place, nothing is copied. That holds only if
TensorRT hands the plugin the binding itself, i.e. the cache input feeds that one plugin and needs
no reformat: the rewrite checks the first, and a strongly typed network with the pool in the
plugin's dtype gives the second. The other way, TensorRT's aliased plugin outputs
(`TensorDesc.aliased()`, the QDP in-place sample), would keep the three outputs but make every
layer's cache a network output too, whose binding TensorRT may then copy; we keep the plugin as it
is and the graph smaller. (Unverified until a TensorRT host runs tests/test_builder_onnx.py's
contract on CUDA.)

**Precision.** The TensorRT graph is exported in bf16 (the GPU runtime's dtype), the pool inputs in
the runner's pool dtype (bf16, or float8 codes for an FP8 KV cache), and FP8 linears as Q/DQ: a
strongly typed network takes every type from the graph, so FP8 needs no builder flag (TensorRT
refuses precision flags on strongly typed networks). Open: the FP8 K/V rounding in
`Attention.project` exports as Cast to FLOAT8E4M3FN and back, not as Q/DQ.

**Triton's hidden kernel parameters.** Triton >= 3.3 appends two pointers to every kernel after
the user's arguments: global_scratch (3.3) and profile_scratch (3.5). Compiled with triton 3.7.1
for sm_90 (`plugins.tensorrt.compile_kernel`), BlockAttention's PTX entry has 32 parameters: our
30 (9 input pointers, 20 int32 extra args, the output) then those two, and SpecAccept (18) and
DiffusionCommit (15) end the same way; none of the three reads them (their scratch sizes are 0, no
ld.param of them: tests/test_builder_onnx.py checks this). TensorRT's AOT launch passes inputs,
extra args and outputs only, so the kernel params array it builds is two entries short of the
entry: the launch must pass two more pointer-sized arguments, which may be null (never read), or
the two declarations must be removed from the PTX before it is handed to TensorRT.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from trimode.builder import onnx_backend, onnx_export
from trimode.builder.program import PassShape, lookup
from trimode.builder.settings import BuildSettings
from trimode.errors import InputError, MissingDependencyError, TrimodeError
from trimode.fp8 import E4M3
from trimode.kv_cache import KVCache
from trimode.model import NLDModel
from trimode.passes import PassKind
from trimode.plugins.onnx_ops import DOMAIN, TENSORRT_ATTRS

TRT_DIR = "tensorrt"
TRT_DTYPE = torch.bfloat16
MIN_VERSION = (10, 9)  # quickly deployable plugins with aot_impl


class BuildError(TrimodeError):
    """TensorRT could not parse or build a program."""


def require_tensorrt():
    """TensorRT >= 10.9 and a CUDA GPU, or one line saying what is missing (call before writing)."""
    try:
        import tensorrt as trt
        import tensorrt.plugin  # noqa: F401
    except ImportError as err:
        raise MissingDependencyError(
            "tensorrt >= 10.9 (NVIDIA's wheel; --onnx-only works without it)", "tensorrt"
        ) from err
    if tuple(int(x) for x in trt.__version__.split(".")[:2]) < MIN_VERSION:
        raise MissingDependencyError(f"tensorrt >= 10.9 (found {trt.__version__})", "tensorrt")
    if not has_cuda():
        raise InputError("--backend tensorrt needs a CUDA GPU (use --onnx-only to export and check the graphs)")
    return trt


def require(settings: BuildSettings) -> None:
    """What build_engine calls before anything is written: TensorRT and a GPU, unless --onnx-only."""
    if not settings.onnx_only:
        require_tensorrt()


def has_cuda() -> bool:
    return torch.cuda.is_available()


def pool_dtype(model: NLDModel) -> torch.dtype:
    """The runner's pool dtype on the GPU: float8 codes for an FP8 KV cache, else the runtime dtype."""
    return E4M3 if model.encoder.layers[0].self_attn.k_scale is not None else TRT_DTYPE


def trt_graph(graph):
    """Rewrite an exported program for TensorRT's parser (see the module docstring), in place."""
    nodes = [n for n in graph.node if n.domain == DOMAIN and n.op_type == "BlockAttention"]
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    dropped = set()
    for i, node in enumerate(nodes):
        for slot, cache in ((3, f"k_{i}"), (4, f"v_{i}")):
            # the plugin writes this binding in place: nothing else may read it
            if node.input[slot] != cache or [id(n) for n in consumers.get(cache, [])] != [id(node)]:
                raise BuildError(f"BlockAttention {i}: input {slot} should be {cache}, read by it alone")
        attrs = {a.name for a in node.attribute}
        needed = {*TENSORRT_ATTRS, "is_causal", "row_width"}  # the plugin's signature takes both always
        if not needed <= attrs:
            raise BuildError(f"BlockAttention {i} lacks {sorted(needed - attrs)}")
        dropped.update(node.output[1:])
        del node.output[1:]
    keep = [o for o in graph.output if o.name not in dropped]
    if [o.name for o in keep] != ["logits"]:
        raise BuildError(f"expected the pool outputs to come straight from BlockAttention, left {keep}")
    del graph.output[:]
    graph.output.extend(keep)
    return graph


def profile_shapes(shape: PassShape, settings: BuildSettings) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) per dynamic input: batch 1..max_batch_size, prefill length 1..max_input_len
    (the tables' width T static; a quadratic program's chunk W(W+1) static)."""
    B, L = settings.max_batch_size, shape.chunk
    tokens = ((1, L), (B, L), (B, L)) if L else ((1, 1), (B, settings.max_input_len), (B, settings.max_input_len))
    T = settings.blocks_per_seq
    shapes = {"tokens": tokens, "tables": ((1, T), (B, T), (B, T)), "lengths": ((1,), (B,), (B,))}
    if shape.kind.last_logit_only:
        shapes["logit_index"] = shapes["lengths"]
    return shapes


def build(
    model: NLDModel,
    shapes: list[PassShape],
    out_dir: Path,
    settings: BuildSettings,
    on_program: Callable[[PassShape], None],
) -> dict:
    """Export and rewrite the graphs (onnx/), then, unless settings.onnx_only, one engine per shape."""
    trt = None if settings.onnx_only else require_tensorrt()  # before anything is written
    onnx = onnx_backend._import_onnx()
    out_dir = Path(out_dir)
    export_model = onnx_export.graph_model(model.cpu() if model.device.type != "cpu" else model, TRT_DTYPE)
    files: list[str] = []
    report: dict[str, Any] = {"programs": {}, "dtype": "bfloat16", "pool_dtype": str(pool_dtype(model))}
    for shape in shapes:
        path = out_dir / onnx_backend.ONNX_DIR / f"{shape.name}.onnx"
        start = time.perf_counter()
        with torch.no_grad():
            onnx_export.export_pass(export_model, shape, settings, path, pool_dtype(model))
        graph = onnx.load(str(path))
        trt_graph(graph.graph)
        onnx.save(graph, str(path))
        onnx.checker.check_model(str(path))
        plugins = [n for n in graph.graph.node if n.domain == DOMAIN]
        report["programs"][shape.name] = {
            "file": path.relative_to(out_dir).as_posix(),
            "export_s": round(time.perf_counter() - start, 2),
            "num_nodes": len(graph.graph.node),
            "plugins": [n.op_type for n in plugins],
            "profile": {k: [list(s) for s in v] for k, v in profile_shapes(shape, settings).items()},
        }
        files.append(path.relative_to(out_dir).as_posix())
        if trt is None:
            on_program(shape)
    if trt is not None:
        files += _build_engines(trt, out_dir, shapes, settings, on_program)
    (out_dir / TRT_DIR).mkdir(parents=True, exist_ok=True)
    (out_dir / TRT_DIR / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    files.append(f"{TRT_DIR}/report.json")
    versions = onnx_backend.versions()
    if trt is not None:
        versions["tensorrt"] = trt.__version__
    return {
        "files": files,
        "engines": {s.name: f"{TRT_DIR}/{s.name}.engine" for s in shapes} if trt else {},
        "onnx_only": settings.onnx_only,
        "max_batch_size": settings.max_batch_size,
        "max_seq_len": settings.max_seq_len,
        "max_input_len": settings.max_input_len,
        "kv_block_size": settings.kv_block_size,
        "num_kv_blocks": settings.pool_blocks,
        "pool_dtype": report["pool_dtype"],
        "versions": versions,
    }


def _build_engines(
    trt, out_dir: Path, shapes: list[PassShape], settings: BuildSettings, on_program: Callable[[PassShape], None]
) -> list[str]:
    from trimode.plugins.tensorrt import register_plugins

    register_plugins()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = out_dir / TRT_DIR / "timing.cache"
    timing_cache = None
    files = []
    for shape in shapes:
        # strongly typed: every type (bf16, FP8 Q/DQ, the float8 pool) comes from the graph
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(out_dir / onnx_backend.ONNX_DIR / f"{shape.name}.onnx")):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BuildError(f"TensorRT cannot parse {shape.name}: {errors}")
        config = builder.create_builder_config()
        timing_cache = timing_cache or config.create_timing_cache(b"")
        config.set_timing_cache(timing_cache, False)  # one cache shared by every program of the engine dir
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile_shapes(shape, settings).items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise BuildError(f"TensorRT could not build {shape.name} (see its log above)")
        path = out_dir / TRT_DIR / f"{shape.name}.engine"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(engine))
        files.append(path.relative_to(out_dir).as_posix())
        on_program(shape)
    assert timing_cache is not None  # made by the first program; there is always one (pass_shapes)
    cache_path.write_bytes(bytes(timing_cache.serialize()))
    return files + [cache_path.relative_to(out_dir).as_posix()]


class TensorRTBackend:
    """The runner's backend over one execution context per program; the pool (CUDA, the engine's
    pool dtype, [num_kv_blocks + 1, Hkv, P, D] per layer) is bound as is and written in place."""

    def __init__(self, contexts: dict, model: NLDModel, manifest: dict):
        self.contexts, self.max_input_len = contexts, manifest["max_input_len"]
        spec = model.spec
        self.pool_shape = onnx_backend.pool_shape(model, manifest)
        self.pool_dtype, self.vocab_size = manifest["pool_dtype"], spec.vocab_size

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
        shape, context = lookup(self.contexts, kind, L, self.max_input_len)
        k0 = pool.k[0]
        if k0.device.type != "cuda" or str(k0.dtype) != self.pool_dtype or tuple(k0.shape) != self.pool_shape:
            raise InputError(
                f"the KV pool is {tuple(k0.shape)} {k0.dtype} on {k0.device}; this engine needs "
                f"{self.pool_shape} {self.pool_dtype} on CUDA"
            )
        device = k0.device
        feeds = {
            "tokens": tokens.to(device, torch.long).contiguous(),
            "tables": pool.slot_tables(slots).to(device).contiguous(),
            "lengths": torch.tensor(lengths, device=device),
        }
        if kind.last_logit_only:
            feeds["logit_index"] = (
                torch.full((b,), L - 1, device=device) if logit_index is None else logit_index.to(device, torch.long)
            )
        for name, x in feeds.items():
            context.set_input_shape(name, tuple(x.shape))
            context.set_tensor_address(name, x.data_ptr())
        for i, (k, v) in enumerate(zip(pool.k, pool.v)):  # in/out bindings: the plugin writes them
            context.set_tensor_address(f"k_{i}", k.data_ptr())
            context.set_tensor_address(f"v_{i}", v.data_ptr())
        logits = torch.empty((b, 1 if kind.last_logit_only else L, self.vocab_size), device=device)
        context.set_tensor_address("logits", logits.data_ptr())
        if not context.execute_async_v3(torch.cuda.current_stream(device).cuda_stream):
            raise TrimodeError(f"TensorRT failed to run {shape.name}")
        return logits


def load(engine_dir: Path, model: NLDModel, manifest: dict) -> TensorRTBackend:
    """manifest: the dict `build` returned. The AOT plugins are inside the engines: no Python plugin
    code is needed to run them."""
    trt = require_tensorrt()
    if not manifest.get("engines"):
        raise InputError(f"{engine_dir}: built with --onnx-only, it has no TensorRT engines to run")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    contexts = {}
    for name, file in manifest["engines"].items():
        engine = runtime.deserialize_cuda_engine((Path(engine_dir) / file).read_bytes())
        if engine is None:
            raise InputError(f"{engine_dir / file}: TensorRT cannot load it; rebuild the engine dir")
        contexts[name] = engine.create_execution_context()
    return TensorRTBackend(contexts, model, manifest)
