"""`trimode train-draft`: the draft adapter's training forward, loss, PEFT files, the stage and its errors."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from safetensors import safe_open

from trimode.checkpoint import ADAPTER_DIR, load_checkpoint, merge_draft_adapter, read_draft_adapter
from trimode.cli import main
from trimode.decoding import GenerationSettings, Mode, generate
from trimode.errors import NumericalError
from trimode.make_checkpoint import write_draft_adapter
from trimode.model import DRAFT_LINEARS
from trimode.passes import PassKind
from trimode.plugins.reference import quadratic_tokens
from trimode.training.corpus import read_texts, split_files
from trimode.training.draft import DraftSettings, train_draft
from trimode.training.draft_data import greedy_sequences
from trimode.training.draft_objective import (
    acceptance_weights,
    draft_layout,
    draft_logits,
    draft_loss,
    install_lora,
    path_acceptance,
)

from tolerance import forward_bound


def random_factors(model, rank: int, seed: int = 0, names=("o_proj",)):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, layer in enumerate(model.encoder.layers):
        for name in names:
            w = getattr(getattr(layer, DRAFT_LINEARS[name]), name).weight
            out[i, name] = (
                0.2 * torch.randn(rank, w.shape[1], generator=g),
                0.2 * torch.randn(w.shape[0], rank, generator=g),
            )
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A few standard-library files as --data: tokenizing the whole library would dominate the tests."""
    path = tmp_path_factory.mktemp("data") / "text.py"
    path.write_text("\n".join(read_texts(split_files()[0][:6])))
    return path


@pytest.mark.numerics
@pytest.mark.parametrize("names", [("o_proj",), tuple(DRAFT_LINEARS)])
@pytest.mark.parametrize("block_length", [4, 8])
def test_training_forward_equals_the_runtime_draft_pass(tiny_dir, block_length, names):
    """Draft logits of the many-blocks training forward == the runtime's block pass with the merged
    adapter after an adapter-off causal prefill, block by block (fp32); also with LoRAs on q/k/v,
    whose block K/V the draft pass makes with the twins while the prefix keeps the base ones."""
    model = load_checkpoint(tiny_dir, draft_adapter=False).model
    factors, scale = random_factors(model, rank=4, names=names), 2.0
    g = torch.Generator().manual_seed(1)
    seqs = torch.randint(5, model.spec.vocab_size, (2, 40), generator=g)
    starts = torch.tensor([[9, 20, 31], [12, 13, 25]])
    batch = draft_layout(seqs, starts, block_length, model.spec.mask_token_id)
    with torch.no_grad():
        trained = draft_logits(model, install_lora(model, factors, scale), batch)
    merge_draft_adapter(model, factors, scale)
    for b in range(2):
        for k, q in enumerate(starts[b].tolist()):
            cache = model.new_cache(1, 64)
            model(seqs[b : b + 1, :q], cache, PassKind.PREFILL)
            cache.advance(torch.tensor([0]), torch.tensor([q]))
            block = torch.full((1, block_length), model.spec.mask_token_id)
            block[0, 0] = seqs[b, q]
            with torch.no_grad():
                runtime = model(block, cache, PassKind.DRAFT)[0]
            # the many-blocks forward sums in another order (its masked attention spans 40 + blocks keys)
            atol = forward_bound(runtime, model.spec, span=batch.tokens.shape[1])
            torch.testing.assert_close(trained[b, k], runtime, atol=atol, rtol=0)
            assert torch.equal(batch.targets[b, k], seqs[b, q + 1 : q + block_length])


@pytest.mark.numerics
@pytest.mark.parametrize("names", [("o_proj",), tuple(DRAFT_LINEARS)])
def test_quadratic_rows_equal_the_runtime_quadratic_pass(tiny_dir, names):
    """A quadratic training block at q (MASK x W, the seed unseen) == mask row i of the runtime's
    quadratic pass whose verify chain's token i sits at q-1: every row of one pass, against blocks at
    p+1 .. p+W. Its targets are the tokens after the bonus position q."""
    width, p = 4, 13
    model = load_checkpoint(tiny_dir, draft_adapter=False).model
    factors, scale = random_factors(model, rank=4, names=names), 2.0
    seqs = torch.randint(5, model.spec.vocab_size, (1, 30), generator=torch.Generator().manual_seed(3))
    starts = torch.arange(p + 1, p + 1 + width)[None]
    batch = draft_layout(seqs, starts, width, model.spec.mask_token_id, quadratic=True)
    assert (batch.tokens[0, seqs.shape[1] :] == model.spec.mask_token_id).all()
    with torch.no_grad():
        trained = draft_logits(model, install_lora(model, factors, scale), batch)
    merge_draft_adapter(model, factors, scale)
    cache = model.new_cache(1, 64)
    model(seqs[:, :p], cache, PassKind.PREFILL)
    cache.advance(torch.tensor([0]), torch.tensor([p]))
    with torch.no_grad():
        runtime = model(quadratic_tokens(seqs[:, p : p + width], model.spec.mask_token_id), cache, PassKind.QUADRATIC)
    rows = runtime[0, width:].view(width, width, -1)  # after the chain: W rows of W masks
    atol = forward_bound(rows, model.spec, span=batch.tokens.shape[1])
    torch.testing.assert_close(trained[0], rows, atol=atol, rtol=0)
    for i, q in enumerate(starts[0].tolist()):
        assert torch.equal(batch.targets[0, i], seqs[0, q + 1 : q + width])


def test_the_prefix_runs_without_the_adapter(tiny_dir):
    """Adapter on everywhere (the wrong function) gives different draft logits: the per-row switch matters."""
    model = load_checkpoint(tiny_dir, draft_adapter=False).model
    factors = random_factors(model, rank=4)
    seqs = torch.randint(5, model.spec.vocab_size, (1, 30), generator=torch.Generator().manual_seed(2))
    batch = draft_layout(seqs, torch.tensor([[12, 20]]), 8, model.spec.mask_token_id)
    loras = install_lora(model, factors, 2.0)
    with torch.no_grad():
        right = draft_logits(model, loras, batch)
        batch.is_draft[:] = True
        wrong = draft_logits(model, loras, batch)
    assert (right - wrong).abs().max() > 1e-3


@pytest.mark.parametrize(
    "correct, weights",
    [
        ([1, 1, 1, 1], [1, 1, 1, 1]),  # all accepted: every position counts
        ([1, 1, 0, 1], [1, 1, 1, 0]),  # up to and including the first wrong one
        ([0, 1, 1, 1], [1, 0, 0, 0]),
        ([1, 0, 0, 0], [1, 1, 0, 0]),
    ],
)
def test_acceptance_weights(correct, weights):
    assert acceptance_weights(torch.tensor(correct, dtype=torch.bool)).tolist() == weights


def test_draft_loss_counts_accepted_like_the_verifier():
    V, mask_id = 10, 4
    targets = torch.tensor([[[5, 6, 7]]])  # draft indices 1..3 of one block of 4
    logits = torch.zeros(1, 1, 4, V)
    logits[0, 0, 1, 5] = 5.0  # right
    logits[0, 0, 2, mask_id], logits[0, 0, 2, 6] = 9.0, 5.0  # right once the mask token is excluded
    logits[0, 0, 3, 8] = 5.0  # wrong
    loss, accepted = draft_loss(logits, targets, mask_id, "accept")
    assert accepted.tolist() == [[3]]
    ce = torch.nn.functional.cross_entropy(logits[0, 0, 1:], targets[0, 0], reduction="none")
    torch.testing.assert_close(loss, ce.mean())
    logits[0, 0, 1, 9] = 6.0  # now the first draft is wrong: only it counts
    loss, accepted = draft_loss(logits, targets, mask_id, "accept")
    assert accepted.tolist() == [[1]]
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[0, 0, 1], targets[0, 0, 0]))
    plain, _ = draft_loss(logits, targets, mask_id, "ce")
    assert not torch.isclose(plain, loss)


@pytest.mark.parametrize(
    "starts, accepted, path",
    [
        ([[10, 11, 12, 13, 14, 15]], [[2, 1, 3, 1, 1, 1]], [2, 3, 1]),  # 10 -> 12 -> 15 -> past the last offset
        ([[13, 12, 10, 11, 15, 14]], [[1, 3, 2, 1, 1, 1]], [2, 3, 1]),  # the same blocks in sampled order
        ([[10, 11, 12], [10, 12, 13]], [[1, 1, 1], [1, 5, 5]], [1, 1, 1, 1]),  # row 2 stops at offset 11, not drafted
        ([[11, 12]], [[4, 4]], []),  # the first seed's block was not drafted
    ],
)
def test_path_acceptance_walks_the_runtime_cycles(starts, accepted, path):
    """Each cycle starts where the previous one's accepted tokens end, from the first seed (offset 10)."""
    assert path_acceptance(torch.tensor(starts), torch.tensor(accepted), 10) == path


def test_peft_files_round_trip(tiny_dir, tmp_path):
    """Written in PEFT format, read back, merged by the loader into W + scale * B @ A."""
    import shutil

    d = tmp_path / "ck"
    shutil.copytree(tiny_dir, d)
    base = load_checkpoint(d).model
    factors = random_factors(base, rank=6)
    write_draft_adapter(d / ADAPTER_DIR, factors, alpha=24.0)
    cfg = json.loads((d / ADAPTER_DIR / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == ("LORA", 6, 24.0, ["o_proj"])
    with safe_open(str(d / ADAPTER_DIR / "adapter_model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(
            f"base_model.model.encoder.layers.{i}.self_attn.o_proj.lora_{x}.weight"
            for i in range(len(factors))
            for x in "AB"
        )
    stored = {key: (a.to(torch.bfloat16).float(), b.to(torch.bfloat16).float()) for key, (a, b) in factors.items()}
    read, scale = read_draft_adapter(d / ADAPTER_DIR, base)
    assert scale == 4.0 and list(read) == list(stored)
    for key, (a, b) in stored.items():
        assert torch.equal(a, read[key][0]) and torch.equal(b, read[key][1])
    model = load_checkpoint(d).model
    for (i, _), (a, b) in stored.items():
        layer, w = model.encoder.layers[i], base.encoder.layers[i].self_attn.o_proj.weight
        torch.testing.assert_close(layer.self_attn.o_proj_draft.weight, w + 4.0 * b @ a)
        assert torch.equal(layer.self_attn.o_proj.weight, w)
    assert not load_checkpoint(d, draft_adapter=False).model.has_draft_adapter


PARAGRAPH = (
    "def generate(prompt, max_new_tokens=32):\n    tokens = tokenize(prompt)\n"
    "    for step in range(max_new_tokens):\n        tokens.append(model(tokens).argmax())\n"
    "    return detokenize(tokens)\n"
) * 20
SMALL = dict(
    steps=30, lr=1e-2, warmup=3, batch_size=2, prompt_len=16, gen_len=24, draft_tokens=64, rank=8, num_eval_prompts=2
)


def fixed_batch_loss(model, factors, scale, seqs, block_length=4, quadratic=False) -> float:
    """The draft loss (plain CE) of one fixed batch of greedy sequences under the given adapter."""
    starts = torch.arange(16, seqs.shape[1] - block_length + 1).expand(len(seqs), -1)
    batch = draft_layout(seqs, starts, block_length, model.spec.mask_token_id, quadratic)
    with torch.no_grad():
        logits = draft_logits(model, install_lora(model, factors, scale), batch)
    return draft_loss(logits, batch.targets, model.spec.mask_token_id, "ce")[0].item()


def test_training_lowers_the_loss_and_writes_a_loadable_checkpoint(tiny_dir, tmp_path):
    """A short text, so the training windows cover the fixed batch the loss is measured on."""
    data = tmp_path / "short.txt"
    data.write_text(PARAGRAPH)
    out = tmp_path / "out"
    log = train_draft(tiny_dir, out, DraftSettings(block_lengths=(4, 8), data=data, **SMALL), progress=False)
    # every (mode, block length) in turn; held-out acceptance labelled as `trimode eval` labels runs
    assert [(h["mode"], h["block_length"]) for h in log["history"][:5]] == [
        ("self-spec", 4),
        ("self-spec", 8),
        ("quadratic", 4),
        ("quadratic", 8),
        ("self-spec", 4),
    ]
    assert set(log["held_out_acceptance"]["before"]) == {"self-spec/4", "self-spec/8", "quadratic/4", "quadratic/8"}
    # the loss of a fixed batch of the checkpoint's greedy continuations, before and after
    ck = load_checkpoint(tiny_dir, draft_adapter=False)
    text = ck.tokenizer.encode_plain(PARAGRAPH)
    prompts = [text[i : i + 16] for i in range(0, 200, 8)]
    seqs = greedy_sequences(ck.model, prompts, 24)
    trained, scale = read_draft_adapter(out / ADAPTER_DIR, ck.model)
    zero = {key: (a, torch.zeros_like(b)) for key, (a, b) in trained.items()}
    for quadratic in (False, True):  # both row patterns learn
        before = fixed_batch_loss(ck.model, zero, scale, seqs, quadratic=quadratic)
        after = fixed_batch_loss(ck.model, trained, scale, seqs, quadratic=quadratic)
        assert after < before - 0.25, (quadratic, before, after)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).read_bytes() == (tiny_dir / name).read_bytes()
    assert not list(tmp_path.glob(".*tmp"))
    ck = load_checkpoint(out)
    assert ck.model.has_draft_adapter
    prompts = [[1, 5, 9, 30, 7], [1, 11, 12]]
    ar = generate(ck.model, prompts, GenerationSettings(mode=Mode.AR, max_new_tokens=20, ignore_eos=True))
    spec = generate(
        ck.model, prompts, GenerationSettings(mode=Mode.SELF_SPEC, block_length=8, max_new_tokens=20, ignore_eos=True)
    )
    assert [r.tokens for r in spec] == [r.tokens for r in ar]


def test_seeded(tiny_dir, text_file, tmp_path):
    settings = DraftSettings(data=text_file, **{**SMALL, "steps": 3, "num_eval_prompts": 0})
    a = train_draft(tiny_dir, tmp_path / "a", settings, progress=False)
    b = train_draft(tiny_dir, tmp_path / "b", settings, progress=False)
    assert a["history"] == b["history"]
    name = f"{ADAPTER_DIR}/adapter_model.safetensors"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_an_existing_adapter_is_continued(tiny_adapter_dir, text_file, tmp_path, runner):
    common = ["--data", str(text_file), "--steps", "2", "--batch-size", "1", "--num-eval-prompts", "0", "--json"]
    result = runner.invoke(main, ["train-draft", str(tiny_adapter_dir), "--out", str(tmp_path / "a"), *common])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["continued"] and (report["rank"], report["alpha"]) == (4, 16.0)
    result = runner.invoke(
        main, ["train-draft", str(tiny_adapter_dir), "--out", str(tmp_path / "b"), "--fresh", "--rank", "2", *common]
    )
    assert result.exit_code == 0, result.output
    assert not json.loads(result.output)["continued"]
    result = runner.invoke(
        main, ["train-draft", str(tiny_adapter_dir), "--out", str(tmp_path / "c"), "--rank", "2", *common]
    )
    assert result.exit_code == 1 and "--fresh" in result.output and not (tmp_path / "c").exists()


def test_modules_and_rank_grow_a_continued_adapter(tiny_adapter_dir, text_file, tmp_path, runner):
    """--modules and a larger --rank on an o_proj adapter of rank 4: o_proj continues from its
    B @ A at rank 6, gate_proj and v_proj start at PEFT's zero delta; the written adapter targets all
    three at one rank and the old scale. Leaving o_proj out is refused."""
    common = [
        "--data",
        str(text_file),
        "--steps",
        "1",
        "--batch-size",
        "1",
        "--num-eval-prompts",
        "0",
        "--json",
        "--lr",
        "1e-9",
    ]
    result = runner.invoke(
        main,
        [
            "train-draft",
            str(tiny_adapter_dir),
            "--out",
            str(tmp_path / "a"),
            "--modules",
            "gate_proj,o_proj,v_proj",
            "--rank",
            "6",
            *common,
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["modules"] == ["v_proj", "o_proj", "gate_proj"]
    cfg = json.loads((tmp_path / "a" / ADAPTER_DIR / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["v_proj", "o_proj", "gate_proj"] and (cfg["r"], cfg["lora_alpha"]) == (6, 24.0)
    model = load_checkpoint(tiny_adapter_dir, draft_adapter=False).model
    before, _ = read_draft_adapter(tiny_adapter_dir / ADAPTER_DIR, model)
    after, _ = read_draft_adapter(tmp_path / "a" / ADAPTER_DIR, model)
    for key, (a, b) in after.items():
        if key[1] == "o_proj":  # one step at lr 1e-9: the stored delta, up to bf16
            torch.testing.assert_close(b @ a, before[key][1] @ before[key][0], atol=1e-2, rtol=1e-2)
        else:
            assert b.abs().max() < 1e-6  # B starts at zero
    result = runner.invoke(
        main, ["train-draft", str(tiny_adapter_dir), "--out", str(tmp_path / "b"), "--modules", "gate_proj", *common]
    )
    assert result.exit_code == 1 and "also adapts o_proj" in result.output and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "args, message, exit_code",
    [
        (["--rank", "0"], "--rank", 2),  # out of range where parsed: a usage error
        (["--alpha", "nan"], "--alpha", 2),
        (["--steps", "0"], "--steps", 2),
        (["--lr", "0"], "--lr", 2),
        (["--seed", "-1"], "--seed", 2),
        (["--block-length", "1"], "--block-length", 1),
        (["--block-length", "8,x"], "--block-length", 1),
        (["--data", "/nonexistent/text"], "--data", 1),
        (["--modules", "lm_head"], "--modules", 1),
        (["--modules", ","], "--modules", 1),
        (["--modes", "ar"], "--modes", 1),  # AR has no drafts
        (["--modes", ","], "--modes", 1),
        (["--block-length", "4,128"], "--block-length", 1),  # longer than the greedy continuations it trains on
    ],
)
def test_bad_settings_give_one_line_errors(refused, tiny_dir, tmp_path, args, message, exit_code):
    """One Error line naming the option, and only options train-draft has."""
    error = refused(["train-draft", tiny_dir, "--out", tmp_path / "out", *args], tmp_path, message, exit_code).error
    assert list(tmp_path.iterdir()) == []
    options = {opt for param in main.commands["train-draft"].params for opt in param.opts}
    assert set(re.findall(r"--[a-z][a-z-]*", error)) <= options, error


def test_non_finite_training_writes_nothing(refused, tiny_adapter_dir, text_file, tmp_path):
    """An lr that turns the (continued) LoRA into NaN is refused at the step it happens, naming the
    tensor; no adapter is written."""
    error = refused(
        [
            "train-draft",
            tiny_adapter_dir,
            "--out",
            tmp_path / "out",
            "--data",
            text_file,
            "--lr",
            "1e30",
            "--steps",
            "3",
            "--batch-size",
            "1",
            "--num-eval-prompts",
            "0",
        ],
        tmp_path,
        "non-finite",
    ).error
    assert "step" in error and "lora_" in error and "--lr" in error


def test_an_error_during_training_starts_its_own_line(runner, tiny_dir, text_file, tmp_path, monkeypatch):
    """The progress bar is closed before the Error line, so that line starts at column 0."""
    import trimode.training.draft as draft

    steps = []

    def failing_step(*args, **kwargs):
        steps.append(1)
        if len(steps) == 2:
            raise NumericalError("boom")
        return real_step(*args, **kwargs)

    real_step = draft.train_step
    monkeypatch.setattr(draft, "train_step", failing_step)
    result = runner.invoke(
        main,
        [
            "train-draft",
            str(tiny_dir),
            "--out",
            str(tmp_path / "out"),
            "--data",
            str(text_file),
            "--steps",
            "3",
            "--batch-size",
            "1",
            "--num-eval-prompts",
            "0",
        ],
    )
    assert result.exit_code == 1 and "train-draft" in result.stderr  # the bar was shown
    assert "Error: boom" in result.stderr.splitlines(), repr(result.stderr)
    assert not (tmp_path / "out").exists()


def test_binary_data_is_refused(refused, tiny_dir, tmp_path):
    """--data that is not UTF-8 text is an Error naming the file, not text of replacement characters."""
    data = tmp_path / "data.txt"
    data.write_bytes(random.Random(0).randbytes(4096))
    error = refused(
        ["train-draft", tiny_dir, "--out", tmp_path / "out", "--data", data, "--steps", "1", "--num-eval-prompts", "0"],
        tmp_path,
        "not UTF-8 text",
    ).error
    assert str(data) in error and "--data" in error


def test_missing_checkpoint_and_existing_output(runner, tiny_dir, tmp_path):
    result = runner.invoke(main, ["train-draft", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and result.output.startswith("Error:") and "config.json" in result.output
    assert list(tmp_path.iterdir()) == []
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    result = runner.invoke(main, ["train-draft", str(tiny_dir), "--out", str(existing)])
    assert result.exit_code == 1 and "--force" in result.output and result.output.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["existing"] and (existing / "keep.txt").read_text() == "mine"


def test_eval_against_no_adapter(runner, tiny_adapter_dir, tiny_dir):
    args = ["--num-prompts", "2", "--prompt-len", "8", "--max-new-tokens", "8", "--block-lengths", "4"]
    result = runner.invoke(main, ["eval", str(tiny_adapter_dir), "--against-no-adapter", "--json", *args])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["draft_adapter"] and not report["against"]["draft_adapter"]
    assert report["against"]["agreement"]["self-spec/4"]["token_agreement"] == 1.0  # both are AR greedy
    result = runner.invoke(main, ["eval", str(tiny_dir), "--against-no-adapter", *args])
    assert result.exit_code == 1 and "no draft adapter" in result.output
