"""The `torch` backend: each pass program compiled ahead of time with torch.export + AOTInductor.

One `.pt2` package per PassShape (program.py), batch dynamic up to max_batch_size, the span of
keys dynamic up to max_seq_len, the prefill chunk dynamic up to max_input_len. The packages hold
no weights: the engine dir keeps the checkpoint once, and each loaded package points at tensors made
on load (`load_constants(..., user_managed=True)`): the eager model's own, and the fused,
pre-transposed GEMM matrices of gemms.py, made once from them and shared by every program. So N
programs cost one extra copy of the GEMM weights, and the eager model stays available as the oracle.
Per block length one block program serves the three block-sized passes (program.py): denoise and
verify differ only in the attention pattern, an input; draft only in the o_proj it reads, so its
pass loads the same package a second time with the draft adapter's tensors in place of o_proj's
(when the two have the same layout; else draft gets a package of its own). A build compiles two
programs plus one per block length.

What we measured while writing it (../shared/notes/stack.md, "Compiling the forward"): a slice
`pool[:, :, :S]` with a symbolic S makes export guard on S != max_seq_len (a contiguity check), so
the program gathers the span with one index instead; and an AOTInductor package holding a Python
custom op silently returned wrong results, so these programs hold only aten ops (the traceable
attention of program.py) and every engine is checked against the eager model when it is built.
Inductor's own CPU GEMM template (freezing + max-autotune) ran 8-token passes up to a quarter
faster at batch 1, but it packs the weights into each package at compile time (10x the engine
dir, no shared weights) and was no faster at batch 8 or for one token: not used.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from trimode.builder.gemms import ProgramGemms
from trimode.builder.program import PassProgram, PassShape, lookup
from trimode.builder.settings import BuildSettings
from trimode.decoding.runner import PassOutput
from trimode.errors import EngineError
from trimode.kv_cache import KVCache
from trimode.model import NLDModel
from trimode.passes import PassKind, Pattern

PROGRAM_DIR = "programs"
SPAN_ALIGN = 64  # spans are rounded up to a multiple of this: fewer distinct shapes, same results


def require(settings: BuildSettings) -> None:
    """What build_engine calls before anything is written: nothing to check, torch runs everywhere."""


def example_inputs(model: NLDModel, shape: PassShape, pool: KVCache) -> tuple:
    """Inputs to trace with: batch 2 and a prefill chunk of 2 (a size of 1 would be specialised)."""
    b, L = 2, shape.length or 2
    device = model.device
    return (torch.zeros(b, L, dtype=torch.long, device=device), torch.tensor([3, 5], device=device),
            torch.tensor([0, 1], device=device), torch.arange(16, device=device),
            torch.zeros(b, dtype=torch.long, device=device), torch.tensor(False, device=device), *pool.k, *pool.v)


NUM_INPUTS = 6  # before the pool: tokens, lengths, rows, key_index, logit_index, causal


def dynamic_shapes(shape: PassShape, settings: BuildSettings, num_pool: int) -> tuple:
    batch = torch.export.Dim("batch", min=1, max=settings.max_batch_size)
    span = torch.export.Dim("span", min=1, max=settings.max_seq_len)
    tokens = {0: batch} if shape.length else {0: batch, 1: torch.export.Dim("chunk", min=1, max=settings.max_input_len)}
    return (tokens, {0: batch}, {0: batch}, {0: span}, {0: batch}, None, (None,) * num_pool)  # *pool: one argument


def _layout(module: torch.nn.Module) -> list:
    """What a compiled program depends on in a GEMM module: its submodules' types and its tensors' names,
    shapes and dtypes (not their values, which are loaded: `load`)."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return [type(m) for m in module.modules()] + [(n, t.shape, t.dtype) for n, t in tensors]


def draft_reuses_denoise(gemms: ProgramGemms) -> bool:
    """Whether the draft pass can run the denoise program over the draft o_proj's tensors (`load`)."""
    return all(layer.o_draft is None or _layout(layer.o_draft) == _layout(layer.o) for layer in gemms.layers)


def draft_constant(name: str) -> str:
    """The tensor a denoise program's constant `name` reads when the program runs as the draft pass."""
    return re.sub(r"^(gemms\.layers\.\d+)\.o\.", r"\1.o_draft.", name)


def build(model: NLDModel, shapes: list[PassShape], out_dir: Path, settings: BuildSettings,
          on_program: Callable[[PassShape], None]) -> dict:
    """Export and compile every shape into out_dir/programs/<name>.pt2. -> manifest entries: the
    package of each program ("programs") and the programs that read the draft o_proj ("draft")."""
    import torch._inductor as inductor

    pool = model.new_cache(settings.max_batch_size, settings.max_seq_len)
    gemms = ProgramGemms(model)
    reuse_for_draft = draft_reuses_denoise(gemms)
    (out_dir / PROGRAM_DIR).mkdir()
    files, seconds, programs = [], {}, {}
    for shape in shapes:
        if shape.kind == PassKind.VERIFY or (shape.kind == PassKind.DRAFT and reuse_for_draft):
            # the block program: pass_shapes puts a block length's denoise first
            programs[shape.name] = programs[PassShape(PassKind.DENOISE, shape.length).name]
            on_program(shape)
            continue
        began = time.perf_counter()
        program = PassProgram(model, shape.kind, gemms).eval()
        args = example_inputs(model, shape, pool)
        with torch.no_grad(), warnings.catch_warnings():
            # torch 2.13's own pytree deprecation, printed once per program: noise on a build's stderr
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            exported = torch.export.export(program, args,
                                           dynamic_shapes=dynamic_shapes(shape, settings, len(args) - NUM_INPUTS),
                                           strict=False)
            path = out_dir / PROGRAM_DIR / f"{shape.name}.pt2"
            inductor.aoti_compile_and_package(exported, package_path=str(path),
                                              inductor_configs={"aot_inductor.package_constants_in_so": False})
        files.append(path.relative_to(out_dir).as_posix())
        programs[shape.name] = files[-1]
        seconds[shape.name] = round(time.perf_counter() - began, 1)
        on_program(shape)
    return {"files": files, "programs": programs, "draft": [s.name for s in shapes if s.kind.use_draft],
            "max_seq_len": settings.max_seq_len, "max_input_len": settings.max_input_len, "compile_s": seconds}


class CompiledBackend:
    """The runner's backend (decoding/runner.py) over AOTInductor packages."""

    def __init__(self, programs: dict[str, Callable], max_seq_len: int, max_input_len: int, device: torch.device,
                 constants: dict[str, torch.Tensor]):
        self.programs, self.max_seq_len, self.max_input_len, self.device = programs, max_seq_len, max_input_len, device
        self.constants = constants  # the programs read these tensors in place (user-managed): keep them alive
        self.key_index = torch.arange(max_seq_len, device=device)
        self.causal = {pattern: torch.tensor(pattern == Pattern.CAUSAL, device=device) for pattern in Pattern}

    def __call__(self, kind: PassKind, tokens: torch.Tensor, pool: KVCache, slots: list[int], lengths: list[int],
                 logit_index: torch.Tensor | None) -> PassOutput:
        L = tokens.shape[1]
        _, program = lookup(self.programs, kind, L, self.max_input_len)
        span = min(-(-(max(lengths) + L) // SPAN_ALIGN) * SPAN_ALIGN, self.max_seq_len)
        if logit_index is None:
            logit_index = torch.zeros(len(slots), dtype=torch.long, device=self.device)
        inputs = [tokens, torch.tensor(lengths, device=self.device), torch.tensor(slots, device=self.device),
                  self.key_index[:span], logit_index, self.causal[kind.pattern], *pool.k, *pool.v]
        # the loader's flat call: the package's __call__ re-parses its pytree specs on every pass
        return PassOutput(*program.loader.boxed_run(inputs))


def load(engine_dir: Path, model: NLDModel, manifest: dict) -> CompiledBackend:
    """Load every package of the engine dir, pointed at the model's own weight tensors.
    manifest: the dict `build` returned (the engine manifest's backend section)."""
    constants = {}
    for prefix, module in (("model", model), ("gemms", ProgramGemms(model))):  # the names PassProgram gives them
        constants.update({f"{prefix}.{name}": t.data for name, t in module.state_dict(keep_vars=True).items()})
        constants.update({f"{prefix}.{name}": t for name, t in module.named_buffers()})
    loaded, programs = {}, {}
    for name, file in manifest["programs"].items():
        # a draft program compiled on its own names the draft o_proj already; without an adapter the
        # draft pass reads o_proj, as the eager one does
        is_draft = name in manifest["draft"] and model.has_draft_adapter
        if (file, is_draft) not in loaded:  # denoise and verify share one loaded package
            loaded[file, is_draft] = _load_package(engine_dir, file, name, constants, is_draft)
        programs[name] = loaded[file, is_draft]
    return CompiledBackend(programs, manifest["max_seq_len"], manifest["max_input_len"], model.device, constants)


def _load_package(engine_dir: Path, file: str, name: str, constants: dict[str, torch.Tensor], is_draft: bool):
    import torch._inductor as inductor

    package = inductor.aoti_load_package(str(engine_dir / file))
    source = {n: draft_constant(n) if is_draft else n for n in package.get_constant_fqns()}
    missing = [s for s in source.values() if s not in constants]
    if missing:
        raise EngineError(f"{engine_dir}: the {name} program needs weights the checkpoint lacks "
                          f"({', '.join(missing[:3])}); rebuild the engine")
    package.load_constants({n: constants[s] for n, s in source.items()}, check_full_update=True, user_managed=True)
    return package
