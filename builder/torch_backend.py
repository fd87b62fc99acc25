"""The `torch` backend: each pass program compiled ahead of time with torch.export + AOTInductor.

One `.pt2` package per PassShape (program.py), batch dynamic up to max_batch_size, the span of
keys dynamic up to max_seq_len, the prefill chunk dynamic up to max_input_len; the KV pool's shape
(block size, number of blocks: the build settings') is static, the pool the engine's runner allocates. The packages hold
no weights: the engine dir keeps the checkpoint once, and each loaded package points at tensors made
on load (`load_constants(..., user_managed=True)`): the eager model's own, and the fused,
pre-transposed GEMM matrices of gemms.py, made once from them and shared by every program. So N
programs cost one extra copy of the GEMM weights, and the eager model stays available as the oracle.
Per block length one block program serves the three block-sized passes (program.py): denoise and
verify differ only in the attention pattern, an input; draft only in the weights of the linears the
draft adapter adapts, so its pass loads the same package a second time with the draft GEMMs'
tensors in place of theirs (when the two have the same layout; else draft gets a package of its own).
The quadratic pass (a chunk of W(W+1) tokens, base and draft GEMMs on its own rows) is a package of
its own, without a batch-1 copy (not measured whether one pays; it would add an autotuned compile
per block length to every build). A build compiles two programs plus, per block length, the block
program and the quadratic one.

What we measured while writing it (../shared/notes/stack.md, "Compiling the forward"): a slice
`pool[:, :, :S]` with a symbolic S makes export guard on S != max_seq_len (a contiguity check), so
the program gathers the span with one index instead; and an AOTInductor package holding a Python
custom op silently returned wrong results, so these programs hold only aten ops (the traceable
attention of program.py) and every engine is checked against the eager model when it is built.
Batch-1 block programs: a one-row block pass is GEMM-bound at M = L rows, where MKL's fp32 GEMMs
run well under the core's peak (README, engine performance). On a CPU fp32 model each block
program also gets a copy with the batch fixed at 1 (`<name>_b1.pt2`), compiled with max-autotune,
so that Inductor picks its CPP GEMM template per GEMM where it beats MKL at that M. The template
reads weights blocked [N/bn, K, bn], which Inductor makes at compile time; with the constants kept
out of the package they are left out too: the build records each one as (fused matrix, block
width), checked equal, and loading remakes them (`blocked`), for the draft pass from the draft
GEMMs' matrices. Inductor's template on a dynamic batch was 1.4x slower at batch 8: not used.
Where autotuning keeps MKL for every GEMM of the copy (it does on some CPUs), the copy is dropped and
the manifest says why ("batch1_skipped"): a one-row pass then runs the dynamic-batch program.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trimode.builder.gemms import GROUPS, ProgramGemms
from trimode.builder.pass_graphs import PassGraphs, use_graphs
from trimode.builder.program import PassProgram, PassShape, lookup, quiet_export
from trimode.builder.settings import BuildSettings
from trimode.decoding.runner import PassOutput
from trimode.errors import EngineError
from trimode.kv_cache import KVCache
from trimode.model import NLDModel
from trimode.passes import PassKind, Pattern
from trimode.transfer import to_device

if TYPE_CHECKING:  # what aoti_load_package returns
    from torch.export.pt2_archive._package import AOTICompiledModel

PROGRAM_DIR = "programs"
SPAN_ALIGN = 64  # spans are rounded up to a multiple of this: fewer distinct shapes, same results
BATCH1_SUFFIX = "_b1"
# the batch-1 block programs: Inductor's CPP GEMM template where it beats MKL at M = L rows
BATCH1_CONFIGS = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
# why a block program has no batch-1 copy (the manifest's "batch1_skipped"): which GEMM autotuning
# picks depends on the CPU (an Intel AMX box kept MKL for every GEMM of the embedded checkpoint)
NO_TEMPLATE_GEMM = "autotuning kept the ATen GEMM for every matmul: the copy would be the dynamic program"


def require(settings: BuildSettings) -> None:
    """What build_engine calls before anything is written: nothing to check, torch runs everywhere."""


def example_inputs(model: NLDModel, shape: PassShape, pool: KVCache) -> tuple:
    """Inputs to trace with: batch 2 (1 for a pool of one slot, whose batch is static) and a prefill
    chunk of 2 (a dynamic size of 1 would be specialised)."""
    b, L = min(2, pool.num_slots), shape.chunk or 2
    device = model.device
    return (
        torch.zeros(b, L, dtype=torch.long, device=device),
        torch.tensor([3, 5][:b], device=device),
        pool.block_tables[:b].clone(),
        torch.arange(16, device=device),
        torch.zeros(b, dtype=torch.long, device=device),
        torch.tensor(False, device=device),
        *pool.k,
        *pool.v,
    )


NUM_INPUTS = 6  # before the pool: tokens, lengths, tables, key_index, logit_index, causal


def dynamic_shapes(shape: PassShape, settings: BuildSettings, num_pool: int) -> tuple:
    """Batch, span and the prefill chunk dynamic; the tables' width and the pool static."""
    batch = torch.export.Dim("batch", min=1, max=settings.max_batch_size) if settings.max_batch_size > 1 else None
    span = torch.export.Dim("span", min=1, max=settings.max_seq_len)
    tokens = {0: batch} if shape.length else {0: batch, 1: torch.export.Dim("chunk", min=1, max=settings.max_input_len)}
    return (tokens, {0: batch}, {0: batch}, {0: span}, {0: batch}, None, (None,) * num_pool)  # *pool: one argument


def has_batch1_program(model: NLDModel) -> bool:
    """Whether the block programs get batch-1 copies (module docstring): a CPU fp32 model (FP8 models
    compute in fp64 on CPU, which the GEMM template does not cover)."""
    return model.device.type == "cpu" and model.dtype == torch.float32


def blocked(weight: torch.Tensor, block_n: int) -> torch.Tensor:
    """weight [K, N] -> [ceil(N / block_n), K, block_n], N zero-padded: the CPP GEMM template's
    layout of a constant B (torch._inductor.codegen.cpp_gemm_template, block_weight)."""
    k, n = weight.shape
    padded = -(-n // block_n) * block_n
    return (
        torch.nn.functional.pad(weight, (0, padded - n))
        .reshape(k, padded // block_n, block_n)
        .transpose(0, 1)
        .contiguous()
    )


@contextlib.contextmanager
def recorded_constants():
    """-> {name: tensor} of the constants Inductor adds while lowering: the program's own weights and
    any it makes (the GEMM template's blocked weights)."""
    from torch._inductor.graph import GraphLowering

    made, original = {}, GraphLowering.add_tensor_constant

    def add_tensor_constant(self, data, name=None):
        box = original(self, data, name)
        made[box.get_name()] = data
        return box

    setattr(GraphLowering, "add_tensor_constant", add_tensor_constant)  # a patch of Inductor's method, undone below
    try:
        yield made
    finally:
        setattr(GraphLowering, "add_tensor_constant", original)


def _is_blocked(t: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether t is `blocked(weight, t.shape[2])`."""
    return (
        t.dim() == 3
        and weight.dim() == 2
        and weight.dtype == t.dtype
        and weight.shape[0] == t.shape[1]
        and -(-weight.shape[1] // t.shape[2]) == t.shape[0]
        and torch.equal(blocked(weight, t.shape[2]), t)
    )


def blocked_sources(made: dict[str, torch.Tensor], gemms: ProgramGemms) -> dict[str, list]:
    """{constant name: [fqn of a fused GEMM matrix, block width]} for each constant Inductor made;
    each must be `blocked` of one of the matrices, or loading could not remake it."""
    weights = {f"gemms.{name}": t for name, t in gemms.named_buffers() if name.endswith("weight")}
    sources = {}
    for name, t in made.items():
        source = next(([fqn, t.shape[2]] for fqn, w in weights.items() if _is_blocked(t, w)), None)
        if source is None:
            raise EngineError(
                f"the compiled program holds a constant {name} {tuple(t.shape)} that is no blocked "
                f"GEMM matrix: loading could not remake it"
            )
        sources[name] = source
    return sources


def _layout(module: torch.nn.Module) -> list:
    """What a compiled program depends on in a GEMM module: its submodules' types and its tensors' names,
    shapes and dtypes (not their values, which are loaded: `load`), and the values of its 0-dim
    tensors (an FP8 input_scale), which Inductor writes into the code as literals."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return [type(m) for m in module.modules()] + [
        (n, t.shape, t.dtype, t.item() if t.dim() == 0 else None) for n, t in tensors
    ]


def draft_reuses_denoise(gemms: ProgramGemms) -> bool:
    """Whether the draft pass can run the denoise program over the draft GEMMs' tensors (`load`)."""

    def same(layer, group: str) -> bool:
        draft = getattr(layer, f"{group}_draft")
        return draft is None or _layout(draft) == _layout(getattr(layer, group))

    return all(same(layer, group) for layer in gemms.layers for group in GROUPS)


def draft_constant(name: str, constants: dict[str, torch.Tensor]) -> str:
    """The tensor a denoise program's constant `name` reads when the program runs as the draft pass:
    its group's draft GEMM's, where the adapter adapts that group (`constants` has it)."""
    draft = re.sub(rf"^(gemms\.layers\.\d+)\.({'|'.join(GROUPS)})\.", r"\1.\2_draft.", name)
    return draft if draft in constants else name


def build(
    model: NLDModel,
    shapes: list[PassShape],
    out_dir: Path,
    settings: BuildSettings,
    on_program: Callable[[PassShape], None],
) -> dict:
    """Export and compile every shape into out_dir/programs/<name>.pt2. -> manifest entries: the
    package of each program ("programs"), the programs that read the draft twins ("draft"), the
    batch-1 packages of the block programs ("batch1_programs"), the block programs that got none and
    why ("batch1_skipped"), and the batch-1 packages' blocked constants."""
    import torch._inductor as inductor

    pool = settings.new_pool(model.spec, model.kv_dtype, model.device)  # the engine's: its shape is static
    gemms = ProgramGemms(model)
    reuse_for_draft = draft_reuses_denoise(gemms)
    (out_dir / PROGRAM_DIR).mkdir()
    files: list[str] = []
    seconds: dict[str, float] = {}
    programs: dict[str, str] = {}  # shape name -> package file
    batch1: dict[str, str] = {}
    batch1_skipped: dict[str, str] = {}
    blocked_constants: dict[str, dict[str, list]] = {}

    def compile_program(program: PassProgram, args: tuple, spec: tuple, name: str, configs: dict) -> str:
        with torch.no_grad(), quiet_export(), recorded_constants() as made:
            exported = torch.export.export(program, args, dynamic_shapes=spec, strict=False)
            path = out_dir / PROGRAM_DIR / f"{name}.pt2"
            inductor.aoti_compile_and_package(
                exported,
                package_path=str(path),
                inductor_configs={"aot_inductor.package_constants_in_so": False} | configs,
            )
        files.append(path.relative_to(out_dir).as_posix())
        own = [*program.state_dict(keep_vars=True).values(), *program.buffers()]  # the lowered weights themselves
        made = {
            n: t
            for n, t in made.items()
            if not any(o.shape == t.shape and o.dtype == t.dtype and torch.equal(o, t) for o in own)
        }
        if made:
            blocked_constants[files[-1]] = blocked_sources(made, gemms)
        return files[-1]

    for shape in shapes:
        block = PassShape(PassKind.DENOISE, shape.length).name  # pass_shapes puts a block length's denoise first
        if shape.kind == PassKind.VERIFY or (shape.kind == PassKind.DRAFT and reuse_for_draft):
            programs[shape.name] = programs[block]
            if block in batch1:
                batch1[shape.name] = batch1[block]
            on_program(shape)
            continue
        began = time.perf_counter()
        program = PassProgram(model, shape.kind, gemms).eval()
        args = example_inputs(model, shape, pool)
        spec = dynamic_shapes(shape, settings, len(args) - NUM_INPUTS)
        programs[shape.name] = compile_program(program, args, spec, shape.name, {})
        if shape.kind == PassKind.DENOISE and has_batch1_program(model):
            one = tuple(a[:1] for a in args[:3]) + (args[3], args[4][:1]) + args[5:]
            file = compile_program(
                program,
                one,
                (None, None, None, spec[3], None, None, spec[6]),
                shape.name + BATCH1_SUFFIX,
                BATCH1_CONFIGS,
            )
            if file in blocked_constants:
                batch1[shape.name] = file
            else:  # autotuning kept the ATen GEMM everywhere: the dynamic program at batch 1, a file for nothing
                (out_dir / file).unlink()
                files.remove(file)
                batch1_skipped[shape.name] = NO_TEMPLATE_GEMM
        seconds[shape.name] = round(time.perf_counter() - began, 1)
        on_program(shape)
    return {
        "files": files,
        "programs": programs,
        "draft": [s.name for s in shapes if s.kind.use_draft],
        "batch1_programs": batch1,
        "batch1_skipped": batch1_skipped,
        "blocked_constants": blocked_constants,
        "max_seq_len": settings.max_seq_len,
        "max_input_len": settings.max_input_len,
        "kv_block_size": settings.kv_block_size,
        "num_kv_blocks": settings.pool_blocks,
        "compile_s": seconds,
    }


class CompiledBackend:
    """The runner's backend (decoding/runner.py) over AOTInductor packages."""

    def __init__(
        self,
        programs: dict[str, AOTICompiledModel],
        max_seq_len: int,
        max_input_len: int,
        device: torch.device,
        constants: dict[str, torch.Tensor],
        batch1_programs: dict[str, AOTICompiledModel],
    ):
        self.programs, self.max_seq_len, self.max_input_len, self.device = programs, max_seq_len, max_input_len, device
        self.batch1_programs = batch1_programs  # by shape name: the same pass for a batch of one row
        self.constants = constants  # the programs read these tensors in place (user-managed): keep them alive
        self.key_index = torch.arange(max_seq_len, device=device)
        self.causal = {pattern: torch.tensor(pattern == Pattern.CAUSAL, device=device) for pattern in Pattern}
        self.zeros: dict[int, torch.Tensor] = {}  # by batch size: the logit index of the kinds that ignore it
        self.chosen: dict[tuple, AOTICompiledModel] = {}  # (kind, chunk length, one row) -> its program, once looked up
        self.graphs = PassGraphs(device, max_seq_len) if use_graphs(device) else None  # every pass but prefill

    def __call__(
        self,
        kind: PassKind,
        tokens: torch.Tensor,
        pool: KVCache,
        slots: list[int],
        lengths: list[int],
        logit_index: torch.Tensor | None,
    ) -> PassOutput:
        L = tokens.shape[1]
        key = (kind, L, len(slots) == 1)
        if key not in self.chosen:
            shape, program = lookup(self.programs, kind, L, self.max_input_len)
            self.chosen[key] = self.batch1_programs.get(shape.name, program) if len(slots) == 1 else program
        # the loader's flat call: the package's __call__ re-parses its pytree specs on every pass
        run = self.chosen[key].loader.boxed_run
        if logit_index is None:  # read only by the programs: one tensor per batch size, made once
            if len(slots) not in self.zeros:
                self.zeros[len(slots)] = torch.zeros(len(slots), dtype=torch.long, device=self.device)
            logit_index = self.zeros[len(slots)]
        needed = max(lengths) + L
        constants = [self.causal[kind.pattern], *pool.k, *pool.v]
        if self.graphs is not None and kind is not PassKind.PREFILL:
            span = self.graphs.span(needed)
            return PassOutput(*self.graphs.run(kind, run, tokens, pool, slots, lengths, logit_index, constants, span))
        span = min(-(-needed // SPAN_ALIGN) * SPAN_ALIGN, self.max_seq_len)
        inputs = [
            tokens,
            to_device(lengths, self.device),
            pool.slot_tables(slots),
            self.key_index[:span],
            logit_index,
            *constants,
        ]
        return PassOutput(*run(inputs))


def load(engine_dir: Path, model: NLDModel, manifest: dict) -> CompiledBackend:
    """Load every package of the engine dir, pointed at the model's own weight tensors.
    manifest: the dict `build` returned (the engine manifest's backend section)."""
    constants = {}
    for prefix, module in (("model", model), ("gemms", ProgramGemms(model))):  # the names PassProgram gives them
        constants.update({f"{prefix}.{name}": t.data for name, t in module.state_dict(keep_vars=True).items()})
        constants.update({f"{prefix}.{name}": t for name, t in module.named_buffers()})
    loaded = {}

    def load_all(files: dict[str, str]) -> dict[str, AOTICompiledModel]:
        programs = {}
        for name, file in files.items():
            # a draft program compiled on its own names the draft GEMMs already; without an adapter the
            # draft pass reads the base ones, as the eager one does
            is_draft = name in manifest["draft"] and model.has_draft_adapter
            if (file, is_draft) not in loaded:  # denoise and verify share one loaded package
                blocked_of = manifest.get("blocked_constants", {}).get(file, {})
                loaded[file, is_draft] = _load_package(engine_dir, file, name, constants, is_draft, blocked_of)
            programs[name] = loaded[file, is_draft]
        return programs

    return CompiledBackend(
        load_all(manifest["programs"]),
        manifest["max_seq_len"],
        manifest["max_input_len"],
        model.device,
        constants,
        load_all(manifest.get("batch1_programs", {})),
    )


def _load_package(
    engine_dir: Path,
    file: str,
    name: str,
    constants: dict[str, torch.Tensor],
    is_draft: bool,
    blocked_of: dict[str, list],
) -> AOTICompiledModel:
    """blocked_of: {constant: [fqn, block width]} of the constants to remake with `blocked`; each made
    matrix is added to `constants` (under "blocked:fqn:width"), shared by the packages and kept alive."""
    from trimode.builder.aoti_loader import load_package

    package = load_package(str(engine_dir / file))
    rename = (lambda n: draft_constant(n, constants)) if is_draft else (lambda n: n)
    source = {}
    for n in package.get_constant_fqns():
        if n not in blocked_of:
            source[n] = rename(n)
            continue
        fqn, block_n = rename(blocked_of[n][0]), blocked_of[n][1]
        source[n] = f"blocked:{fqn}:{block_n}"
        if source[n] not in constants and fqn in constants:
            constants[source[n]] = blocked(constants[fqn], block_n)
    missing = [s for s in source.values() if s not in constants]
    if missing:
        raise EngineError(
            f"{engine_dir}: the {name} program needs weights the checkpoint lacks "
            f"({', '.join(missing[:3])}); rebuild the engine"
        )
    package.load_constants({n: constants[s] for n, s in source.items()}, check_full_update=True, user_managed=True)
    return package
