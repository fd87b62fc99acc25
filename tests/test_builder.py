"""builder/: `trimode build` (torch backend), engine dirs, their checks, and engines in every mode.

Two engines are built once per run (each ~1-3 min on a CPU): the embedded trained checkpoint, and
a tiny FP8 checkpoint with a draft adapter. Token parity with the eager reference is checked in every
mode at T = 0, batch 1 and batched (with chunked prefill and ragged prompts), and with requests
joining a running batch (non-contiguous pool rows).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from trimode.builder import BuildSettings, build_engine
from trimode.builder.engine_dir import load_engine
from trimode.cli import main
from trimode.decoding import Engine, EngineConfig, GenerationSettings, Mode, generate
from trimode.errors import ConfigError, EngineError, InputError
from trimode.passes import PassKind, quadratic_chunk

from kv_pools import check_pool_writes, run_pass, twin_pools
from tolerance import forward_bound

# max_seq_len: a 23-token prompt, 24 new tokens and one quadratic cycle of block length 8 (72 positions)
SMALL = BuildSettings(max_batch_size=4, max_seq_len=128, max_input_len=16, kv_block_size=8)
MODES = list(Mode)


@pytest.fixture(scope="module")
def fp8_engine_dir(tiny_deploy_dir):
    """The tiny checkpoint with its draft adapter, FP8-quantized and built by `trimode deploy` (block length 4)."""
    return tiny_deploy_dir / "engine"


@pytest.fixture(scope="module")
def trained_engine_dir(tmp_path_factory):
    from trimode.cli import EMBEDDED_CHECKPOINT

    out = tmp_path_factory.mktemp("engines") / "trained"
    build_engine(EMBEDDED_CHECKPOINT, out, SMALL)
    return out


@pytest.fixture(scope="module", params=["trained", "fp8"])  # trained first: the tiny deploy is built meanwhile
def built(request):
    return load_engine(request.getfixturevalue(f"{request.param}_engine_dir"))


def prompts_for(built, batch: int) -> list[list[int]]:
    """Ragged prompts; the first is longer than max_input_len, so its prefill runs in chunks."""
    rng = torch.Generator().manual_seed(batch)
    vocab = built.checkpoint.spec.vocab_size
    lengths = [23, 5, 11, 2][:batch]
    return [torch.randint(5, vocab, (n,), generator=rng).tolist() for n in lengths]


def eager_engine(built) -> Engine:
    return Engine(built.checkpoint.model, built.config)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("mode", MODES)
def test_engine_tokens_equal_the_eager_reference(built, mode, batch):
    prompts = prompts_for(built, batch)
    settings = GenerationSettings(mode=mode, max_new_tokens=20, block_length=built.block_lengths[0], ignore_eos=True)
    engine_seqs = generate(built.checkpoint.model, prompts, settings, built.new_engine())
    eager_seqs = generate(built.checkpoint.model, prompts, settings, eager_engine(built))
    assert [s.tokens for s in engine_seqs] == [s.tokens for s in eager_seqs]
    if mode is not Mode.AUTO:  # auto picks its passes by their measured time: only its tokens are AR's
        assert [s.stats.to_dict() for s in engine_seqs] == [s.stats.to_dict() for s in eager_seqs]


@pytest.mark.parametrize("batch", [1, 3])
def test_self_spec_and_quadratic_equal_ar_on_the_engine(built, batch):
    prompts = prompts_for(built, batch)
    tokens = {
        mode: [
            s.tokens
            for s in generate(
                built.checkpoint.model,
                prompts,
                GenerationSettings(mode=mode, max_new_tokens=24, block_length=built.block_lengths[0], ignore_eos=True),
                built.new_engine(),
            )
        ]
        for mode in (Mode.AR, Mode.SELF_SPEC, Mode.QUADRATIC)
    }
    assert tokens[Mode.SELF_SPEC] == tokens[Mode.AR] == tokens[Mode.QUADRATIC]


def batch1_expected(built) -> set[str]:
    """The block passes that have a batch-1 program: every one of an fp32 engine's, unless autotuning kept
    the ATen GEMM everywhere on this CPU (then the manifest says so); none of an FP8 engine's."""
    L, backend = built.block_lengths[0], built.manifest["backend"]
    if built.manifest.get("quantization") is not None:
        assert backend["batch1_programs"] == {} and backend["batch1_skipped"] == {}
        return set()
    if f"denoise_{L}" in backend["batch1_skipped"]:
        assert backend["batch1_programs"] == {}
        return set()
    return {f"denoise_{L}", f"draft_{L}", f"verify_{L}"}


def test_a_one_row_block_pass_runs_the_batch_one_program(built, monkeypatch):
    """An fp32 engine has batch-1 copies of its block program where autotuning kept Inductor's GEMM
    template at M = L; a one-row pass runs them, a batch of rows the dynamic-batch program."""
    backend = built.backend
    L = built.block_lengths[0]
    expected = batch1_expected(built)
    assert set(backend.batch1_programs) == expected
    calls = []

    class Counted:
        def __init__(self, program, name):
            self.loader = self
            self.program, self.name = program, name

        def boxed_run(self, inputs):
            calls.append((self.name, inputs[0].shape[0]))
            return self.program.loader.boxed_run(inputs)

    monkeypatch.setattr(backend, "chosen", {})  # the programs each pass looked up so far: the real ones
    monkeypatch.setattr(backend, "programs", {n: Counted(p, n) for n, p in backend.programs.items()})
    monkeypatch.setattr(
        backend, "batch1_programs", {n: Counted(p, n + "_b1") for n, p in backend.batch1_programs.items()}
    )
    for batch in (1, 2):
        generate(
            built.checkpoint.model,
            prompts_for(built, batch),
            GenerationSettings(
                mode=Mode.SELF_SPEC, max_new_tokens=8, block_length=built.block_lengths[0], ignore_eos=True
            ),
            built.new_engine(),
        )
    block_calls = {(name, rows) for name, rows in calls if not name.startswith(("prefill", "decode"))}
    if expected:
        assert block_calls == {(f"draft_{L}_b1", 1), (f"verify_{L}_b1", 1), (f"draft_{L}", 2), (f"verify_{L}", 2)}
    else:
        assert block_calls == {(f"draft_{L}", 1), (f"verify_{L}", 1), (f"draft_{L}", 2), (f"verify_{L}", 2)}


def test_the_compiled_passes_run_on_the_binding_that_lets_go_of_the_gil(built):
    programs = [*built.backend.programs.values(), *built.backend.batch1_programs.values()]
    assert programs and all(getattr(p, "releases_gil", False) for p in programs)  # builder/aoti_loader.py


def test_where_the_binding_cannot_build_the_packages_load_through_torch(trained_engine_dir, monkeypatch):
    from trimode.builder import aoti_loader

    def no_compiler():
        raise OSError("no compiler here")

    aoti_loader.is_available.cache_clear()
    monkeypatch.setattr(aoti_loader, "_extension", no_compiler)
    try:
        with pytest.warns(UserWarning, match="GIL-free AOTInductor binding did not build.*no compiler here"):
            fallback = load_engine(trained_engine_dir)  # re-runs the self-test: the same tokens as eager
    finally:
        aoti_loader.is_available.cache_clear()
    programs = fallback.backend.programs.values()
    assert programs and not any(getattr(p, "releases_gil", False) for p in programs)
    prompts = prompts_for(fallback, 3)
    settings = GenerationSettings(mode=Mode.SELF_SPEC, max_new_tokens=12, block_length=fallback.block_lengths[0])
    model, ours = fallback.checkpoint.model, load_engine(trained_engine_dir).new_engine()
    tokens = [[s.tokens for s in generate(model, prompts, settings, e)] for e in (fallback.new_engine(), ours)]
    assert tokens[0] == tokens[1]


def test_a_build_of_the_binding_past_its_time_limit_is_stopped_and_leaves_nothing(tmp_path, monkeypatch):
    """A build that hangs (on CI one waited 85 min on a build lock) is killed at BUILD_TIMEOUT_S with its
    compiler, and leaves no library and no build folder: the next process builds afresh."""
    from trimode.builder import aoti_loader

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(aoti_loader, "BUILD_TIMEOUT_S", 0.5)
    path = aoti_loader.library_path()
    assert path.is_relative_to(tmp_path)
    with pytest.raises(RuntimeError, match="the build took over 0.5 s and was stopped"):
        aoti_loader.build(path)
    assert list(path.parent.iterdir()) == []


def test_blocked_constants_are_traced_back_to_their_fused_matrix(tiny_adapter_dir):
    """The GEMM template's blocked weights are remade on load from the fused matrix the build traced
    each one to (padded when the block width does not divide N); anything else fails the build."""
    from trimode.builder.gemms import ProgramGemms
    from trimode.builder.torch_backend import blocked, blocked_sources
    from trimode.checkpoint import load_checkpoint

    gemms = ProgramGemms(load_checkpoint(tiny_adapter_dir, dtype=torch.float32).model)
    qkv, draft = gemms.layers[1].qkv.weight, gemms.layers[0].o_draft.weight
    made = {"c0": blocked(qkv, 16), "c1": blocked(draft, 48)}
    assert blocked(qkv, 16).shape == (-(-qkv.shape[1] // 16), qkv.shape[0], 16)
    assert blocked_sources(made, gemms) == {
        "c0": ["gemms.layers.1.qkv.weight", 16],
        "c1": ["gemms.layers.0.o_draft.weight", 48],
    }
    with pytest.raises(EngineError, match="c2 .* no blocked GEMM matrix"):
        blocked_sources({"c2": blocked(qkv, 16) + 1e-3}, gemms)


def test_a_batch1_copy_without_a_template_gemm_is_dropped(tiny_dir, tmp_path, monkeypatch):
    """Where autotuning keeps the ATen GEMM for every matmul (forced here; some CPUs choose it), the
    batch-1 copy is the dynamic program again: the build drops its file and records why, and the
    engine loads, passes its self-test and runs a one-row block pass on the dynamic program."""
    from trimode.builder import torch_backend

    monkeypatch.setattr(torch_backend, "BATCH1_CONFIGS", {"max_autotune": True, "max_autotune_gemm_backends": "ATEN"})
    build_engine(
        tiny_dir,
        tmp_path / "engine",
        BuildSettings(max_batch_size=2, max_seq_len=64, max_input_len=16, block_lengths=(4,)),
    )
    built = load_engine(tmp_path / "engine")
    backend = built.manifest["backend"]
    assert backend["batch1_skipped"] == {"denoise_4": torch_backend.NO_TEMPLATE_GEMM}
    assert backend["batch1_programs"] == backend["blocked_constants"] == {} and built.backend.batch1_programs == {}
    assert sorted((tmp_path / "engine" / "programs").iterdir()) == sorted(
        tmp_path / "engine" / f for f in set(backend["programs"].values())
    )
    prompt = prompts_for(built, 1)
    settings = GenerationSettings(mode=Mode.SELF_SPEC, max_new_tokens=8, block_length=4, ignore_eos=True)
    assert [s.tokens for s in generate(built.checkpoint.model, prompt, settings, built.new_engine())] == [
        s.tokens for s in generate(built.checkpoint.model, prompt, settings, eager_engine(built))
    ]


def test_the_fp8_engines_draft_pass_equals_eager(fp8_engine_dir):
    """An FP8 draft twin has an input_scale of its own, which Inductor bakes into a program as a
    literal: the draft pass must not run the denoise package over the twins' weights alone."""
    from trimode.passes import PassKind

    built = load_engine(fp8_engine_dir)
    model, s = built.checkpoint.model, built.manifest["settings"]
    tokens = torch.randint(5, model.spec.vocab_size, (2, 4), generator=torch.Generator().manual_seed(0))
    for kind in (PassKind.DRAFT, PassKind.DENOISE):
        pool = model.new_cache(s["max_batch_size"], s["max_seq_len"], s["kv_block_size"], s["num_kv_blocks"])
        pool.block_tables[:2, 0] = torch.tensor([5, 2])  # positions 0..3 (block size 16)
        cache = model.new_cache(s["max_batch_size"], s["max_seq_len"])
        got = built.backend(kind, tokens, pool, [0, 1], [0, 0], None).logits
        expected = model(tokens, cache, kind, torch.tensor([0, 1]))
        # the compiled program fuses GEMMs and sums in Inductor's order
        torch.testing.assert_close(got, expected, atol=forward_bound(expected, model.spec, span=4), rtol=0)


def test_an_adapter_on_every_linear_drafts_through_the_engine_as_eager(tiny_wide_adapter_dir, tmp_path):
    """Draft twins of every linear reach the compiled draft pass: the block program serves it over
    the draft GEMMs' tensors (its batch-1 copy too), and its logits equal the eager draft pass's;
    and the quadratic pass's mask rows (the chain's stay AR's)."""
    from trimode.passes import PassKind

    build_engine(
        tiny_wide_adapter_dir,
        tmp_path / "engine",
        BuildSettings(max_batch_size=2, max_seq_len=64, max_input_len=16, block_lengths=(4,)),
    )
    built = load_engine(tmp_path / "engine")
    programs = built.manifest["backend"]["programs"]
    assert programs["draft_4"] == programs["denoise_4"]
    assert ("draft_4" in built.manifest["backend"]["batch1_programs"]) == ("draft_4" in batch1_expected(built))
    model = built.checkpoint.model
    tokens = torch.randint(5, model.spec.vocab_size, (2, 4), generator=torch.Generator().manual_seed(0))
    for rows in ([1], [0, 1]):  # one row runs the batch-1 program
        out = {}
        for kind in (PassKind.DRAFT, PassKind.DENOISE):
            pool, cache = model.new_cache(2, 64, 16), model.new_cache(2, 64)
            pool.block_tables[:, 0] = torch.tensor([3, 1])  # the chunk's block: positions 0..3
            out[kind] = built.backend(kind, tokens[rows], pool, rows, [0] * len(rows), None).logits
            expected = model(tokens[rows], cache, kind, torch.tensor(rows))
            # the compiled program (a batch-1 one for one row) fuses GEMMs and sums in Inductor's order
            torch.testing.assert_close(out[kind], expected, atol=forward_bound(expected, model.spec, span=4), rtol=0)
        assert not torch.allclose(out[PassKind.DRAFT], out[PassKind.DENOISE], atol=1e-3)
    # the quadratic program: base GEMMs on the verify chain, the draft twins on the mask rows
    C = quadratic_chunk(4)
    chunk = torch.cat([tokens, torch.full((2, C - 4), model.spec.mask_token_id)], dim=1)
    pool, cache = model.new_cache(2, 64, 16), model.new_cache(2, 64)
    pool.block_tables[:, :2] = torch.tensor([[3, 0], [1, 2]])  # positions 0..19 (block size 16)
    got = built.backend(PassKind.QUADRATIC, chunk, pool, [0, 1], [0, 0], None).logits
    expected = model(chunk, cache, PassKind.QUADRATIC)
    torch.testing.assert_close(got, expected, atol=forward_bound(expected, model.spec, span=C), rtol=0)
    chain = model(tokens, model.new_cache(2, 64), PassKind.VERIFY)  # the chain: AR's logits, adapter off
    torch.testing.assert_close(got[:, :4], chain, atol=forward_bound(chain, model.spec, span=4), rtol=0)


@pytest.mark.parametrize("width", [1, 2, 3, 8])
def test_the_programs_quadratic_pattern_is_the_references(width):
    """The compiled programs' quadratic mask (bounds per query) and the native ONNX graph's [C, C]
    table say what reference.quadratic_visibility says."""
    from trimode.builder.onnx_export import chunk_visibility
    from trimode.builder.program import quadratic_bounds
    from trimode.passes import Pattern
    from trimode.plugins.reference import quadratic_visibility

    expected = quadratic_visibility(width)
    assert torch.equal(chunk_visibility(Pattern.QUADRATIC, quadratic_chunk(width)), expected)
    chain_end, row_start, row_end = (b[:, None] for b in quadratic_bounds(width))
    key = torch.arange(quadratic_chunk(width))
    assert torch.equal((key < chain_end) | ((key >= row_start) & (key < row_end)), expected)


def test_a_quadratic_program_only_where_its_chunk_fits_max_seq_len(tiny):
    """Block length 8's quadratic chunk (72 positions) does not fit max_seq_len 64: no program (the
    engine refuses such a request when it is added) and no quadratic self-test; block length 4's does."""
    from trimode.builder.engine_dir import self_test
    from trimode.builder.program import PassShape, pass_shapes

    assert [s.name for s in pass_shapes((8, 4), 64) if s.kind == PassKind.QUADRATIC] == ["quadratic_4"]
    assert PassShape(PassKind.QUADRATIC, 4).chunk == 20
    config = EngineConfig(2, 64, 16)
    assert set(self_test(tiny.model, tiny.tokenizer, None, config, 8)) == {"ar", "diffusion", "self-spec"}
    tokens = self_test(tiny.model, tiny.tokenizer, None, config, 4)
    assert set(tokens) == {m.value for m in Mode} and tokens["quadratic"] == tokens["ar"]
    engine = Engine(tiny.model, config, block_lengths=(8,))
    settings = GenerationSettings(mode=Mode.QUADRATIC, max_new_tokens=1, block_length=8)
    with pytest.raises(InputError, match="one cycle \\(72 positions\\)"):
        engine.add([5], settings.sampling, settings.decoding)


@pytest.mark.parametrize("max_batch_size", [1, 3])
def test_programs_export_for_any_max_batch_size(tiny_dir, max_batch_size):
    """A pool of one row has a static batch (torch.export refuses a Dim with min = max = 1), the
    rest a dynamic one: export each program kind (the compile after it is the engine tests')."""
    from trimode.builder.program import PassProgram, PassShape
    from trimode.builder.torch_backend import NUM_INPUTS, dynamic_shapes, example_inputs
    from trimode.checkpoint import load_checkpoint
    from trimode.passes import PassKind

    model = load_checkpoint(tiny_dir, dtype=torch.float32).model
    settings = BuildSettings(max_batch_size=max_batch_size, max_seq_len=32, max_input_len=8)
    pool = settings.new_pool(model.spec, model.kv_dtype)
    for shape in (PassShape(PassKind.PREFILL, None), PassShape(PassKind.DENOISE, 4), PassShape(PassKind.QUADRATIC, 2)):
        args = example_inputs(model, shape, pool)
        with torch.no_grad():
            exported = torch.export.export(
                PassProgram(model, shape.kind).eval(),
                args,
                strict=False,
                dynamic_shapes=dynamic_shapes(shape, settings, len(args) - NUM_INPUTS),
            )
        batch = exported.module()(*args)[1].shape[0]
        assert batch == min(2, max_batch_size)


def test_requests_joining_a_running_batch_get_their_solo_tokens(built):
    """Staggered arrivals of every mode: rows finish and free slots in the middle of the pool,
    so later passes run on non-contiguous rows."""
    prompts = prompts_for(built, 4) + prompts_for(built, 2)
    modes = [Mode.AR, Mode.SELF_SPEC, Mode.DIFFUSION, Mode.QUADRATIC, Mode.SELF_SPEC, Mode.QUADRATIC]
    lengths = [6, 20, 9, 14, 11, 7]

    def settings(i):
        return GenerationSettings(
            mode=modes[i], max_new_tokens=lengths[i], block_length=built.block_lengths[0], ignore_eos=True
        )

    solo = [
        generate(built.checkpoint.model, [p], settings(i), eager_engine(built))[0].tokens for i, p in enumerate(prompts)
    ]
    engine, seqs, step = built.new_engine(), [], 0
    while len(seqs) < len(prompts) or engine.has_work:
        if len(seqs) < len(prompts) and step % 2 == 0:
            s = settings(len(seqs))
            seqs.append(engine.add(prompts[len(seqs)], s.sampling, s.decoding))
        engine.step()
        step += 1
    assert [s.tokens for s in seqs] == solo


@pytest.mark.parametrize(
    "kind, length, slots",
    [
        (PassKind.PREFILL, 5, [2, 0]),  # slots out of order, lengths ragged
        (PassKind.DECODE, 1, [2, 0]),
        (PassKind.DENOISE, None, [2, 0]),  # a block pass, not causal (None: the block length)
        (PassKind.VERIFY, None, [0, 1]),  # causal, contiguous slots
        (PassKind.VERIFY, None, [1]),  # the batch-1 program where there is one
        (PassKind.QUADRATIC, None, [2, 0]),  # a chunk of W(W+1): the verify chain, then W rows of masks
        (PassKind.QUADRATIC, None, [1]),
    ],
)
def test_one_pass_on_shuffled_blocks_equals_eager_on_a_dense_pool(built, kind, length, slots):
    """The torch engine's programs over its paged pool (block size 8 or 16), each slot's blocks
    shuffled: the eager model's logits on a dense pool with the same K/V, the chunk's K/V written
    through the tables, and no other position of the pool touched. The quadratic program: its
    pattern, its repeated RoPE positions and its draft twins on the mask rows are the eager forward's."""
    model, config = built.checkpoint.model, built.config
    L = length or built.block_lengths[0]
    if kind == PassKind.QUADRATIC:  # its chunk is written whole at lengths + 0..C-1 (past the chain: scratch)
        L = quadratic_chunk(L)
    dense, paged = twin_pools(
        model, config.max_slots, config.max_seq_len, config.kv_block_size, config.num_kv_blocks, {0: 13, 1: 9, 2: 6}, L
    )
    assert paged.block_size == config.block_size < config.max_seq_len
    tokens = torch.randint(5, model.spec.vocab_size, (len(slots), L), generator=torch.Generator().manual_seed(L))
    r = run_pass(model, built.backend, kind, tokens, slots, dense, paged)
    span = config.max_seq_len
    torch.testing.assert_close(r.got, r.expected, atol=forward_bound(r.expected, model.spec, span), rtol=0)
    if model.kv_dtype == torch.float8_e4m3fn:  # another summation order may round to the next e4m3 code
        check_pool_writes(r, slots, L, lambda e: e.abs().max().item() / 8)
    else:
        check_pool_writes(r, slots, L, lambda e: forward_bound(e, model.spec, span))


@pytest.fixture
def graphed(built, monkeypatch):
    """built's backend running its passes through PassGraphs (CPU: the same buffers, padding and buckets,
    no capture), fresh for the test."""
    from trimode.builder.pass_graphs import PassGraphs

    graphs = PassGraphs(built.checkpoint.model.device, built.config.max_seq_len)
    monkeypatch.setattr(built.backend, "graphs", graphs)
    return graphs


@pytest.mark.parametrize("kind", [PassKind.DECODE, PassKind.VERIFY, PassKind.DENOISE, PassKind.QUADRATIC])
def test_a_pass_graph_pads_its_batch_into_the_null_block(built, graphed, kind):
    """Three rows run in the graph of four: the eager model's logits for the three, their K/V written
    through their tables, and the padding row's K/V in the null block, nowhere else."""
    model, config = built.checkpoint.model, built.config
    L = 1 if kind is PassKind.DECODE else built.block_lengths[0]
    if kind == PassKind.QUADRATIC:
        L = quadratic_chunk(L)
    dense, paged = twin_pools(
        model, config.max_slots, config.max_seq_len, config.kv_block_size, config.num_kv_blocks, {0: 13, 1: 9, 2: 6}, L
    )
    slots = [2, 0, 1]
    tokens = torch.randint(5, model.spec.vocab_size, (len(slots), L), generator=torch.Generator().manual_seed(L))
    r = run_pass(model, built.backend, kind, tokens, slots, dense, paged)
    assert config.max_slots == 4 and set(graphed.graphs) == {(kind, L, 4, graphed.span(13 + L))}
    span = config.max_seq_len
    torch.testing.assert_close(r.got, r.expected, atol=forward_bound(r.expected, model.spec, span), rtol=0)
    r.written[paged.null_block, torch.arange(L) % paged.block_size] = True  # the padding row's scratch
    if model.kv_dtype == torch.float8_e4m3fn:
        check_pool_writes(r, slots, L, lambda e: e.abs().max().item() / 8)
    else:
        check_pool_writes(r, slots, L, lambda e: forward_bound(e, model.spec, span))


@pytest.mark.parametrize("mode", MODES)
def test_pass_graphs_give_the_engine_s_tokens_in_every_mode(built, mode, monkeypatch):
    """Three ragged requests (a padded bucket of four), then one alone: the same tokens and passes
    through the graphs as without them; prefill never runs in one."""
    from trimode.builder.pass_graphs import PassGraphs

    prompts = prompts_for(built, 3)
    settings = GenerationSettings(mode=mode, max_new_tokens=20, block_length=built.block_lengths[0], ignore_eos=True)
    model = built.checkpoint.model
    plain = [generate(model, p, settings, built.new_engine()) for p in (prompts, prompts[1:2])]
    graphs = PassGraphs(model.device, built.config.max_seq_len)
    monkeypatch.setattr(built.backend, "graphs", graphs)
    graphed = [generate(model, p, settings, built.new_engine()) for p in (prompts, prompts[1:2])]
    for a, b in zip(plain, graphed):
        assert [s.tokens for s in a] == [s.tokens for s in b]
        if mode is not Mode.AUTO:
            assert [s.stats.to_dict() for s in a] == [s.stats.to_dict() for s in b]
    keys = set(graphs.graphs)  # the last engine's: one row
    assert keys and {rows for _, _, rows, _ in keys} == {1}
    assert not any(kind is PassKind.PREFILL for kind, *_ in keys)


def test_a_pass_that_cannot_be_captured_runs_without_graphs(built, graphed, monkeypatch):
    def fails(program, inputs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphed, "capture", True)  # as on CUDA, with a capture that fails
    monkeypatch.setattr(graphed, "_record", fails)
    settings = GenerationSettings(mode=Mode.SELF_SPEC, max_new_tokens=8, block_length=built.block_lengths[0])
    prompts, model = prompts_for(built, 3), built.checkpoint.model
    with pytest.warns(UserWarning, match="capture failed, passes run without graphs: operation not permitted"):
        got = generate(model, prompts, settings, built.new_engine())
    assert not graphed.capture and graphed.graphs  # the same buffers and buckets, run directly
    monkeypatch.setattr(built.backend, "graphs", None)
    assert [s.tokens for s in got] == [s.tokens for s in generate(model, prompts, settings, built.new_engine())]


def test_graph_buckets_and_the_switch(monkeypatch):
    from trimode.builder.pass_graphs import PassGraphs, bucket, buckets, use_graphs

    assert buckets(8) == [1, 2, 4, 8] and buckets(6) == [1, 2, 4, 6] and buckets(1) == [1]
    assert [bucket(n, buckets(6)) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    assert PassGraphs(torch.device("cpu"), 96).spans == [64, 96]
    assert PassGraphs(torch.device("cpu"), 512).span(65) == 128
    monkeypatch.delenv("TRIMODE_PASS_GRAPHS", raising=False)
    assert not use_graphs(torch.device("cpu")) and use_graphs(torch.device("cuda"))
    monkeypatch.setenv("TRIMODE_PASS_GRAPHS", "1")
    assert use_graphs(torch.device("cpu"))
    monkeypatch.setenv("TRIMODE_PASS_GRAPHS", "0")
    assert not use_graphs(torch.device("cuda"))
    monkeypatch.setenv("TRIMODE_PASS_GRAPHS", "on")
    with pytest.raises(ConfigError, match="TRIMODE_PASS_GRAPHS='on': expected 1"):
        use_graphs(torch.device("cuda"))


def test_the_build_records_auto_s_step_times_and_an_engine_starts_from_them(built):
    """Every choice auto makes (AR, and self-spec and quadratic at each block length the engine runs),
    at every batch bucket up to max_batch_size, measured at the build (engine_dir.auto_prior); each
    new engine's auto starts from them."""
    from trimode.builder.pass_graphs import buckets
    from trimode.decoding.auto import choice_name, choices, parse_choice

    prior = built.manifest["auto"]["seconds"]
    sizes = [str(b) for b in buckets(built.config.max_slots)]
    assert set(prior) == {choice_name(c) for c in choices(built.block_lengths)}
    assert all(list(by_size) == sizes and min(by_size.values()) > 0 for by_size in prior.values())
    auto = built.new_engine().auto
    assert auto.seconds == {}  # nothing measured here yet
    for name, by_size in prior.items():
        for size in sizes:
            assert auto.step_seconds(parse_choice(name), int(size)) == by_size[size]


def test_auto_s_build_times_cover_every_block_length(tiny, monkeypatch):
    """An engine of block lengths 4 and 8: AR once, self-spec and quadratic at each, every bucket;
    timed on the threads an engine serves with, whatever the build's."""
    from trimode.builder import engine_dir
    from trimode.decoding.auto import AutoPolicy, choice_name, choices
    from trimode.triton_repo.settings import DEFAULT_ENGINE_THREADS

    config = EngineConfig(max_slots=2, max_seq_len=192)
    timed, threads = engine_dir._step_seconds, torch.get_num_threads()
    seen = []
    monkeypatch.setattr(engine_dir, "_step_seconds", lambda *a: seen.append(torch.get_num_threads()) or timed(*a))
    torch.set_num_threads(DEFAULT_ENGINE_THREADS + 1)
    try:
        prior = engine_dir.auto_prior(tiny.model, tiny.tokenizer, None, config, (4, 8))
        assert seen == [DEFAULT_ENGINE_THREADS] and torch.get_num_threads() == DEFAULT_ENGINE_THREADS + 1
    finally:
        torch.set_num_threads(threads)
    assert set(prior["seconds"]) == {choice_name(c) for c in choices((4, 8))}
    assert all(list(by_size) == ["1", "2"] for by_size in prior["seconds"].values())
    policy = AutoPolicy({})
    policy.seed(prior["seconds"])
    assert policy.seeded == set(choices((4, 8)))


def test_the_kv_bytes_at_build_are_what_an_engine_allocates(built):
    """The manifest's pool (paged: block size 8 or 16) is the one an engine of the engine dir allocates."""
    kv, s = built.manifest["kv_cache"], built.manifest["settings"]
    cache = built.new_engine().runner.cache
    assert kv["block_size"] == cache.block_size == s["kv_block_size"] < s["max_seq_len"]
    assert (
        kv["num_blocks"]
        == cache.num_blocks
        == s["num_kv_blocks"]
        == s["max_batch_size"] * -(-s["max_seq_len"] // s["kv_block_size"])
    )
    assert kv["bytes"] == sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    assert kv["dtype"] == str(cache.k[0].dtype).removeprefix("torch.")


def test_a_dense_engine_within_a_kv_cache_memory_allocates_what_it_records(tiny_dir, tmp_path, runner):
    """--kv-block-size max_seq_len: one dense block per sequence; --kv-cache-memory 128KiB: the blocks
    that budget holds (the null block included), recorded and allocated exactly; inspect shows them."""
    from trimode.kv_cache import block_bytes

    out = tmp_path / "engine"
    args = ["--max-batch-size", "2", "--max-seq-len", "64", "--max-input-len", "16", "--block-lengths", "4"]
    result = runner.invoke(
        main, ["build", str(tiny_dir), "--out", str(out), *args, "--kv-block-size", "64", "--kv-cache-memory", "128KiB"]
    )
    assert result.exit_code == 0, result.output
    built = load_engine(out)
    model, kv = built.checkpoint.model, built.manifest["kv_cache"]
    per_block = block_bytes(model.spec, 64, model.kv_dtype)
    assert kv["num_blocks"] == (128 << 10) // per_block - 1 >= 2 and kv["block_size"] == 64
    assert built.config.num_kv_blocks == kv["num_blocks"] and built.config.block_size == 64
    cache = built.new_engine().runner.cache
    assert cache.num_blocks == kv["num_blocks"] and cache.block_size == 64
    assert kv["bytes"] == sum(t.numel() * t.element_size() for t in cache.k + cache.v) <= 128 << 10
    text = runner.invoke(main, ["inspect", str(out)]).stdout
    assert f"kv cache   {kv['num_blocks']} blocks of 64 positions, float32, {kv['bytes']} bytes" in text
    assert "from --kv-cache-memory 128KiB" in text
    prompt = prompts_for(built, 2)
    settings = GenerationSettings(mode=Mode.SELF_SPEC, max_new_tokens=8, block_length=4, ignore_eos=True)
    assert [s.tokens for s in generate(model, prompt, settings, built.new_engine())] == [
        s.tokens for s in generate(model, prompt, settings, eager_engine(built))
    ]


def test_a_too_small_kv_cache_memory_is_refused_with_the_numbers(tiny_dir, tmp_path, refused):
    """A budget that cannot hold one max_seq_len sequence: one Error line with the blocks it holds and
    the blocks one sequence needs, before anything is compiled or written."""
    from trimode.checkpoint import load_checkpoint
    from trimode.kv_cache import block_bytes

    root = tmp_path / "root"
    shutil.copytree(tiny_dir, root / "tiny")
    model = load_checkpoint(tiny_dir).model
    per_block = block_bytes(model.spec, 16, model.kv_dtype)
    args = ["--max-batch-size", "2", "--max-seq-len", "64", "--max-input-len", "16", "--block-lengths", "4"]
    result = refused(
        ["build", root / "tiny", "--out", root / "out", *args, "--kv-cache-memory", str(3 * per_block)],
        root,
        "holds 2 blocks of 16 positions",
    )
    assert "one sequence of --max-seq-len 64 needs 4" in result.error


def test_a_block_length_the_engine_was_not_built_for_is_refused(built):
    engine = built.new_engine()
    settings = GenerationSettings(mode=Mode.SELF_SPEC, block_length=built.block_lengths[0] + 1)
    with pytest.raises(InputError, match="built for block lengths"):
        engine.add([5, 6, 7], settings.sampling, settings.decoding)


def test_manifest_records_the_build(trained_engine_dir):
    m = json.loads((trained_engine_dir / "manifest.json").read_text())
    assert m["stage"] == "build" and m["settings"]["backend"] == "torch"
    assert m["versions"]["torch"] == torch.__version__
    assert m["device"]["type"] == "cpu" and m["device"]["isa"]
    assert [p["name"] for p in m["programs"]] == [
        "prefill_n",
        "decode_1",
        "denoise_8",
        "draft_8",
        "verify_8",
        "quadratic_8",
    ]
    # one block program serves denoise, verify and (over the adapter's o_proj) draft: three packages
    assert (
        m["backend"]["programs"]["draft_8"]
        == m["backend"]["programs"]["verify_8"]
        == m["backend"]["programs"]["denoise_8"]
    )
    # the quadratic program is a package of its own (its mask rows read the draft GEMMs), not a draft program
    assert m["backend"]["draft"] == ["draft_8"] and list(m["backend"]["compile_s"]) == [
        "prefill_n",
        "decode_1",
        "denoise_8",
        "quadratic_8",
    ]
    assert m["backend"]["programs"]["quadratic_8"] == "programs/quadratic_8.pt2"
    # and a batch-1 copy of it, whose blocked GEMM weights are remade on load from the fused matrices, or,
    # where autotuning on this CPU kept MKL for every GEMM, no copy and the reason (which one is the CPU's call)
    if "denoise_8" in m["backend"]["batch1_skipped"]:
        assert m["backend"]["batch1_programs"] == m["backend"]["blocked_constants"] == {}
        assert not any(name.endswith("_b1.pt2") for name in m["files"])
    else:
        assert m["backend"]["batch1_programs"] == dict.fromkeys(
            ["denoise_8", "draft_8", "verify_8"], "programs/denoise_8_b1.pt2"
        )
        assert list(m["backend"]["blocked_constants"]) == ["programs/denoise_8_b1.pt2"]
        assert all(
            fqn.startswith("gemms.") and fqn.endswith(".weight") and block_n > 0
            for fqn, block_n in m["backend"]["blocked_constants"]["programs/denoise_8_b1.pt2"].values()
        )
    assert set(m["self_test"]["tokens"]) == {mode.value for mode in Mode}  # quadratic's 72 positions fit
    tokens = m["self_test"]["tokens"]
    assert tokens["self-spec"] == tokens["quadratic"] == tokens["ar"]
    assert all((trained_engine_dir / name).is_file() for name in m["files"])
    assert "checkpoint/model.safetensors" in m["files"]


def tamper_edit_manifest(d, monkeypatch):
    m = json.loads((d / "manifest.json").read_text())
    m["settings"]["max_seq_len"] *= 2
    (d / "manifest.json").write_text(json.dumps(m))


def tamper_swap_weights(d, monkeypatch):
    path = d / "checkpoint" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # one weight byte, header and size unchanged
    path.write_bytes(bytes(data))


def tamper_other_torch(d, monkeypatch):
    from trimode.builder import manifest

    real = manifest._version
    monkeypatch.setattr(manifest, "_version", lambda name: "9.9.9" if name == "torch" else real(name))


def tamper_other_cpu(d, monkeypatch):
    from trimode.builder import manifest

    monkeypatch.setattr(manifest, "device_info", lambda device: {"type": "cpu", "name": "x86_64", "isa": "DEFAULT"})


def tamper_extra_file(d, monkeypatch):
    (d / "programs" / "decode_2.pt2").write_bytes(b"not ours")


def tamper_self_test(d, monkeypatch):
    """A manifest resealed with other self-test tokens: what a program that computes differently here
    than on the build machine looks like."""
    from trimode.builder.manifest import seal

    m = json.loads((d / "manifest.json").read_text())
    m["self_test"]["tokens"]["diffusion"][0][0] += 1
    (d / "manifest.json").write_text(json.dumps(seal(m)))


def tamper_before_quadratic(d, monkeypatch):
    """An engine dir of a trimode before quadratic self-spec: format 3, no quadratic program (resealed)."""
    from trimode.builder.manifest import seal

    m = json.loads((d / "manifest.json").read_text())
    m["format"] = 3
    m["programs"] = [p for p in m["programs"] if p["kind"] != "quadratic"]
    del m["backend"]["programs"]["quadratic_8"], m["self_test"]["tokens"]["quadratic"]
    (d / "manifest.json").write_text(json.dumps(seal(m)))


def tamper_before_paged_pools(d, monkeypatch):
    """An engine dir of a trimode before the paged KV pool: format 2, no kv settings (resealed)."""
    from trimode.builder.manifest import seal

    m = json.loads((d / "manifest.json").read_text())
    m["format"] = 2
    del m["kv_cache"], m["settings"]["kv_block_size"], m["settings"]["num_kv_blocks"]
    (d / "manifest.json").write_text(json.dumps(seal(m)))


@pytest.mark.parametrize(
    "tamper, message",
    [
        (tamper_before_quadratic, "quadratic self-speculation: a program per block length and its self-test; format 5"),
        (tamper_before_paged_pools, "since then: format 3, the KV cache became a pool of blocks"),
        (tamper_edit_manifest, "manifest.json was edited after the build"),
        (tamper_swap_weights, "checkpoint/model.safetensors changed after the build"),
        (tamper_other_torch, "built with torch"),
        (tamper_other_cpu, "rebuild the engine on this machine"),
        (tamper_extra_file, "programs/decode_2.pt2 was not part of the build"),
        (tamper_self_test, "diffusion self-test gives other tokens"),
    ],
)
def test_a_tampered_engine_is_refused_on_load(trained_engine_dir, tmp_path, monkeypatch, runner, tamper, message):
    d = tmp_path / "engine"
    shutil.copytree(trained_engine_dir, d)
    tamper(d, monkeypatch)
    with pytest.raises(EngineError, match=message):
        load_engine(d)
    result = runner.invoke(main, ["generate", "--engine", str(d), "hello"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]


def test_generate_and_eval_run_through_the_engine(trained_engine_dir, runner):
    args = ["def f(x):", "--mode", "self-spec", "--max-new-tokens", "12", "--json"]
    with_engine = runner.invoke(main, ["generate", "--engine", str(trained_engine_dir), *args])
    eager = runner.invoke(main, ["generate", *args])
    assert with_engine.exit_code == 0 and eager.exit_code == 0, with_engine.output + eager.output
    assert json.loads(with_engine.stdout)["results"][0]["tokens"] == json.loads(eager.stdout)["results"][0]["tokens"]
    report = runner.invoke(
        main,
        [
            "eval",
            "--engine",
            str(trained_engine_dir),
            "--num-prompts",
            "2",
            "--max-new-tokens",
            "16",
            "--max-ppl-windows",
            "2",
            "--prompt-len",
            "32",  # and 16 new tokens and a quadratic cycle's 72 positions fit max_seq_len 128
            "--json",
        ],
    )
    assert report.exit_code == 0, report.output
    modes = json.loads(report.stdout)["modes"]
    assert set(modes) == {"ar", "diffusion", "self-spec/8", "quadratic/8"}
    assert modes["self-spec/8"]["token_agreement"] == modes["quadratic/8"]["token_agreement"] == 1.0


def test_inspect_prints_the_manifest(trained_engine_dir, runner):
    text = runner.invoke(main, ["inspect", str(trained_engine_dir)])
    assert text.exit_code == 0, text.output
    skipped = json.loads((trained_engine_dir / "manifest.json").read_text())["backend"]["batch1_skipped"]
    batch1 = (
        "no batch-1 copy of denoise_8 (autotuning kept the ATen GEMM"
        if skipped
        else "batch-1 copies of programs/denoise_8_b1.pt2"
    )
    kv = json.loads((trained_engine_dir / "manifest.json").read_text())["kv_cache"]
    for expected in (
        "backend    torch on cpu",
        "max_batch_size 4, max_seq_len 128",
        f"kv cache   64 blocks of 8 positions, float32, {kv['bytes']} bytes",
        f"verify_8, quadratic_8 (4 compiled); {batch1}",
        "self-test",
        "auto       ms per step at build: ar b1 ",
    ):
        assert expected in text.stdout
    as_json = runner.invoke(main, ["inspect", str(trained_engine_dir), "--json"])
    assert json.loads(as_json.stdout) == json.loads((trained_engine_dir / "manifest.json").read_text())


def test_an_existing_engine_is_replaced_only_with_force(trained_engine_dir, refused, tmp_path):
    d = tmp_path / "engine"
    shutil.copytree(trained_engine_dir, d)
    refused(["build", "--out", d], tmp_path, "exists and is not empty (--force replaces a previous build output)")


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["build", "{tiny}", "--out", "{out}", "--max-batch-size", "0"], "--max-batch-size", 2),
        (["build", "{tiny}", "--out", "{out}", "--kv-block-size", "0"], "--kv-block-size", 2),
        (["build", "{tiny}", "--out", "{out}", "--kv-cache-memory", "2 parsecs"], "--kv-cache-memory: KV cache", 1),
        (["build", "{tiny}", "--out", "{out}", "--kv-cache-memory", "1.5"], "--kv-cache-memory: KV cache", 1),
        (["build", "{tiny}", "--out", "{out}", "--backend", "vllm"], "'vllm' is not one of", 2),
        (["build", "{tiny}", "--out", "{out}", "--block-lengths", "4,x"], "expected integers", 2),
        (
            [
                "build",
                "{tiny}",
                "--out",
                "{out}",
                "--max-seq-len",
                "32",
                "--max-input-len",
                "8",
                "--block-lengths",
                "32",
            ],
            "--block-lengths: expected below --max-seq-len (32)",
            1,
        ),
        (
            ["build", "{tiny}", "--out", "{out}", "--max-seq-len", "32", "--max-input-len", "64"],
            "--max-input-len: expected at most --max-seq-len (32)",
            1,
        ),
        (["build", "{tiny}", "--out", "{tiny}/engine"], "lies inside the input", 1),
        (["build", "{other}", "--out", "{out}"], "model_type", 1),
        (["build", "{tiny}", "--out", "{out}", "--onnx-only"], "--onnx-only: expected used with --backend tensorrt", 1),
        (["build", "{tiny}", "--out", "{out}", "--backend", "tensorrt"], "tensorrt >= 10.9", 1),
        (
            ["build", "{tiny}", "--out", "{out}", "--max-input-len", "4", "--block-lengths", "8"],
            "--block-lengths: expected at most --max-input-len (4)",
            1,
        ),
        (["inspect", "{tiny}"], "not an engine dir", 1),
        (["inspect", "{out}"], "not a directory", 1),
    ],
)
def test_bad_build_input_is_one_line_and_writes_nothing(tiny_dir, tmp_path, refused, args, message, code):
    root = tmp_path / "root"
    shutil.copytree(tiny_dir, root / "tiny")
    other = root / "other"
    shutil.copytree(tiny_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    filled = [a.format(tiny=root / "tiny", out=root / "out", other=other) for a in args]
    refused(filled, root, message, code)


@pytest.fixture(scope="module")
def onnx_built(tmp_path_factory):
    """build_engine --backend onnx of the embedded checkpoint; its build-time self-test already
    compared it with the eager model (the build fails on any difference)."""
    from trimode.cli import EMBEDDED_CHECKPOINT

    out = tmp_path_factory.mktemp("engines") / "onnx"
    build_engine(EMBEDDED_CHECKPOINT, out, BuildSettings(**{**SMALL.__dict__, "backend": "onnx"}))
    return load_engine(out)


@pytest.mark.parametrize("mode", MODES)
def test_onnx_engine_tokens_equal_the_eager_reference(onnx_built, mode):
    assert onnx_built.checkpoint.model.dtype == torch.float32  # the graphs' dtype: the oracle's
    prompts = prompts_for(onnx_built, 3)
    settings = GenerationSettings(mode=mode, max_new_tokens=16, block_length=8, ignore_eos=True)
    engine = [s.tokens for s in generate(onnx_built.checkpoint.model, prompts, settings, onnx_built.new_engine())]
    eager = [s.tokens for s in generate(onnx_built.checkpoint.model, prompts, settings, eager_engine(onnx_built))]
    assert engine == eager
    if mode in (Mode.SELF_SPEC, Mode.QUADRATIC):
        ar = GenerationSettings(mode=Mode.AR, max_new_tokens=16, ignore_eos=True)
        assert engine == [s.tokens for s in generate(onnx_built.checkpoint.model, prompts, ar, onnx_built.new_engine())]


def test_onnx_engine_manifest_and_inspect(onnx_built, runner):
    m = onnx_built.manifest
    assert m["versions"]["onnxruntime"] and m["versions"]["onnx"]
    assert sorted(m["backend"]["programs"]) == [
        "decode_1",
        "denoise_8",
        "draft_8",
        "prefill_n",
        "quadratic_8",
        "verify_8",
    ]
    assert "backend    onnx on cpu" in runner.invoke(main, ["inspect", str(onnx_built.path)]).stdout


def test_tensorrt_onnx_only_exports_the_plugin_graphs_and_cannot_be_run(tiny_dir, tmp_path, runner):
    out = tmp_path / "trt"
    # a process of its own: what the exporters print (warnings, logging) reaches its stderr, not pytest's capture
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "trimode.cli",
            "build",
            str(tiny_dir),
            "--out",
            str(out),
            "--backend",
            "tensorrt",
            "--onnx-only",
            "--max-batch-size",
            "2",
            "--max-seq-len",
            "64",
            "--max-input-len",
            "16",
            "--block-lengths",
            "4",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # with --json no progress bar, and the exporters' per-program notes are silenced
    manifest = json.loads(result.stdout)
    assert manifest["settings"]["onnx_only"] and (out / "tensorrt" / "report.json").is_file()
    assert "(ONNX only)" in runner.invoke(main, ["inspect", str(out)]).stdout
    refused = runner.invoke(main, ["generate", "--engine", str(out), "hello"])
    assert refused.exit_code == 1 and "--onnx-only" in refused.stderr and "Traceback" not in refused.output


def test_a_killed_build_leaves_no_engine_dir(tiny_dir, tmp_path):
    """SIGKILL in the middle of compiling: the output path never appears (only the hidden lock and
    temporary sibling, which the next run to that output removes; tests/test_stage_output.py)."""
    import os
    import signal
    import time

    out = tmp_path / "engine"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trimode.cli",
            "build",
            str(tiny_dir),
            "--out",
            str(out),
            "--max-batch-size",
            "2",
            "--max-seq-len",
            "64",
            "--max-input-len",
            "16",
            "--block-lengths",
            "4",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if list(tmp_path.glob(".engine.build-*/programs")):  # the first program is compiling, more to come
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the build ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert all(name.startswith(".engine.") for name in os.listdir(tmp_path))


def test_a_kv_pool_the_machine_cannot_hold_is_refused_before_anything(tiny_dir, tmp_path, refused, monkeypatch):
    """build and load size the pool (layers x K,V x slots x positions x kv heads x head_dim x bytes) and
    refuse it against the memory there is, before allocating it or writing anything."""
    from trimode import kv_cache

    monkeypatch.setattr(kv_cache, "available_memory", lambda device: (64 << 20, "a 64 MiB test limit"))
    root = tmp_path / "root"
    shutil.copytree(tiny_dir, root / "tiny")
    result = refused(
        [
            "build",
            root / "tiny",
            "--out",
            root / "out",
            "--max-batch-size",
            "4096",
            "--max-seq-len",
            "4096",
            "--max-input-len",
            "16",
            "--block-lengths",
            "4",
        ],
        root,
        "KV pool",
    )
    # the tiny model: 2 layers x K,V x 4096 x 4096 x 2 kv heads x 16 x 4 bytes (fp32 on CPU) = 8 GiB
    assert f"the KV pool of {4096 * 4096 // 16} blocks x 16 positions" in result.error
    assert "needs 8.0 GiB, and cpu has 64.0 MiB (a 64 MiB test limit)" in result.error


def test_a_kv_pool_above_the_memory_there_is_is_refused_on_load_and_allocate(fp8_engine_dir, monkeypatch):
    from trimode import kv_cache
    from trimode.config import ModelSpec

    spec = ModelSpec.from_file(fp8_engine_dir / "checkpoint" / "config.json")
    with pytest.raises(InputError, match="KV pool"):  # the real limits: 2^20 slots x 2^20 positions fit no machine
        kv_cache.KVCache.allocate(spec, 1 << 20, 1 << 20, torch.float32)
    monkeypatch.setattr(kv_cache, "available_memory", lambda device: (1 << 10, "a 1 KiB test limit"))
    with pytest.raises(InputError, match="a 1 KiB test limit"):
        load_engine(fp8_engine_dir)


def test_a_checkpoint_with_a_nan_weight_is_refused_naming_the_tensor(tiny_dir, tmp_path, refused):
    from safetensors.torch import load_file, save_file

    root = tmp_path / "root"
    shutil.copytree(tiny_dir, root / "tiny")
    path = root / "tiny" / "model.safetensors"
    state = load_file(path)
    state["encoder.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, path, metadata={"format": "pt"})
    refused(
        [
            "build",
            root / "tiny",
            "--out",
            root / "out",
            "--max-batch-size",
            "2",
            "--max-seq-len",
            "64",
            "--max-input-len",
            "16",
            "--block-lengths",
            "4",
        ],
        root,
        "encoder.layers.1.mlp.up_proj.weight",
    )
