"""Train the draft-only LoRA (`linear_spec_lora/`, spec §2 and §7) by self-distillation.

Targets are the checkpoint's own AR greedy continuations: at temperature 0 self-speculation accepts
a draft token exactly when it equals that continuation, so nothing else can raise acceptance. One
greedy continuation of G tokens after a prompt gives a training block at every offset j: prefix =
prompt + gen[:j] (causal, adapter OFF, as the runtime's prefill and verify passes cache it), block
= [gen[j], MASK x (L-1)] (bidirectional, adapter ON, the runtime's draft pass), and block index i
must predict gen[j+i] (block logits predict the token AT their position, spec §4).

One forward trains many blocks (`draft_objective.py`); only the LoRA A and B train.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from trimode.checkpoint import ADAPTER_DIR, Checkpoint, Factors, load_checkpoint, read_draft_adapter, read_quant_config
from trimode.decoding import Mode
from trimode.errors import InputError, NumericalError
from trimode.model import DRAFT_LINEARS, NLDModel
from trimode.training.draft_data import TargetPool, held_out_acceptance, token_stream, validation_prompts
from trimode.training.draft_objective import (
    DraftLoRA,
    draft_layout,
    draft_logits,
    draft_loss,
    init_factors,
    install_lora,
    path_acceptance,
    sample_starts,
)

WEIGHTINGS = ("accept", "ce")
DRAFT_MODES = (Mode.SELF_SPEC.value, Mode.QUADRATIC.value)  # the modes whose drafts the adapter makes: their rows
STAGE = "train-draft"


@dataclass(frozen=True)
class DraftSettings:
    rank: int | None = None  # None: the existing adapter's, else DEFAULT_RANK
    modules: tuple[str, ...] | None = (
        None  # linears to adapt (DRAFT_LINEARS); None: the existing adapter's, else o_proj
    )
    alpha: float | None = None  # None: the existing adapter's, else 2 * rank
    block_lengths: tuple[int, ...] = (8,)  # cycled over steps
    modes: tuple[str, ...] = DRAFT_MODES  # the draft rows' patterns (draft_layout), cycled over steps
    steps: int = 200
    lr: float = 5e-3
    warmup: int = 20
    batch_size: int = 4  # text windows per step
    prompt_len: int = 64
    gen_len: int = 64  # greedy tokens per window: the blocks' prefixes and targets
    gen_batch_size: int = 64  # windows continued per generate() call (a pass costs about the same at 8 or 64)
    draft_tokens: int = 512  # per window: min(all offsets, draft_tokens // L) blocks
    weighting: str = "accept"  # "accept": up to the first wrong draft; "ce": the whole block
    seed: int = 0
    data: Path | None = None  # None: the fixture's training files (standard library)
    fresh: bool = False  # ignore an adapter the input checkpoint already has
    num_eval_prompts: int = 16  # held-out acceptance before/after (0: skip)

    def __post_init__(self) -> None:
        _check(self.rank is None or self.rank >= 1, "rank", "an integer >= 1", self.rank)
        _check(self.alpha is None or self.alpha > 0, "alpha", "a number > 0", self.alpha)
        _check(
            self.modules is None or (bool(self.modules) and set(self.modules) <= DRAFT_LINEARS.keys()),
            "modules",
            f"a comma-separated list of {', '.join(DRAFT_LINEARS)}",
            ",".join(self.modules or ()),
        )
        _check(
            bool(self.block_lengths) and min(self.block_lengths) >= 2,
            "block-length",
            "integers >= 2 (a block of 1 has nothing to draft)",
            ",".join(map(str, self.block_lengths)),
        )
        _check(
            bool(self.modes) and set(self.modes) <= set(DRAFT_MODES),
            "modes",
            f"a comma-separated list of {', '.join(DRAFT_MODES)}",
            ",".join(self.modes),
        )
        _check(self.steps >= 1, "steps", "an integer >= 1", self.steps)
        _check(self.lr > 0, "lr", "a number > 0", self.lr)
        _check(self.weighting in WEIGHTINGS, "weighting", " or ".join(WEIGHTINGS), self.weighting)
        # gen_len is internal: name the option the user can change
        _check(
            self.gen_len >= max(self.block_lengths),
            "block-length",
            f"lengths of at most {self.gen_len} (the greedy tokens generated per training window)",
            ",".join(map(str, self.block_lengths)),
        )
        _check(
            self.batch_size >= 1 and self.prompt_len >= 1,
            "batch-size / prompt-len",
            "integers >= 1",
            (self.batch_size, self.prompt_len),
        )


DEFAULT_RANK = 64


def _check(ok: bool, name: str, expected: str, value: object) -> None:
    if not ok:
        raise InputError(f"--{name}: expected {expected}, got {value}")


# --- the stage ---------------------------------------------------------------------------------


@dataclass
class StartingPoint:
    factors: Factors
    rank: int
    alpha: float
    is_continued: bool


def check_paths(checkpoint_dir: Path, out_dir: Path, force: bool) -> None:
    """Input errors before any work: a missing checkpoint, an unusable output (stage_output's rules)."""
    from trimode.stage_output import check_output

    if not (checkpoint_dir / "config.json").is_file():
        raise InputError(f"{checkpoint_dir}: not a checkpoint directory (no config.json)")
    check_output(out_dir, STAGE, [checkpoint_dir], force)
    if read_quant_config(checkpoint_dir) is not None:
        raise InputError(
            f"{checkpoint_dir}: an FP8 checkpoint; train the adapter on the bf16 checkpoint, "
            f"then quantize the result (trimode quantize)"
        )


def starting_adapter(ck: Checkpoint, settings: DraftSettings, generator: torch.Generator) -> StartingPoint:
    """Continue the input's linear_spec_lora/ (unless settings.fresh), with PEFT's zero-delta start
    for linears --modules adds; else that start on every linear --modules names."""
    adapter_dir = ck.checkpoint_dir / ADAPTER_DIR
    if adapter_dir.is_dir() and not settings.fresh:
        factors, scale = read_draft_adapter(adapter_dir, ck.model)
        rank = next(iter(factors.values()))[0].shape[0]
        if settings.rank is not None and settings.rank < rank:
            raise InputError(
                f"--rank {settings.rank}: {adapter_dir} has rank {rank} (a larger --rank grows it); "
                f"pass --fresh to start a new adapter"
            )
        if settings.alpha is not None and not math.isclose(settings.alpha / (settings.rank or rank), scale):
            raise InputError(
                f"--alpha {settings.alpha}: {adapter_dir} has alpha {scale * rank:g} (scale {scale:g}); "
                f"pass --fresh to start a new adapter"
            )
        if settings.rank is not None and settings.rank > rank:
            factors, rank = grown(factors, settings.rank, generator), settings.rank
        adapted = {name for _, name in factors}
        modules = settings.modules or tuple(adapted)
        if dropped := [n for n in DRAFT_LINEARS if n in adapted - set(modules)]:
            raise InputError(
                f"--modules: {adapter_dir} also adapts {','.join(dropped)}; name those too, "
                f"or pass --fresh to start a new adapter"
            )
        factors.update(init_factors(ck.model, rank, generator, [n for n in modules if n not in adapted]))
        return StartingPoint(_in_order(factors), rank, scale * rank, True)
    rank = settings.rank or DEFAULT_RANK
    return StartingPoint(
        _in_order(init_factors(ck.model, rank, generator, settings.modules or ("o_proj",))),
        rank,
        settings.alpha or 2.0 * rank,
        False,
    )


def grown(factors: Factors, rank: int, generator: torch.Generator) -> Factors:
    """The same adapter at a larger rank, at the same scale: B gets zero columns, so every B @ A is
    unchanged, and A rows of PEFT's random start, which then train like a new adapter's."""
    out = {}
    for key, (a, b) in factors.items():
        extra = (torch.rand(rank - a.shape[0], a.shape[1], generator=generator) * 2 - 1) / math.sqrt(a.shape[1])
        out[key] = torch.cat([a, extra]), torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)
    return out


def _in_order(factors: Factors) -> Factors:
    """By layer, then in DRAFT_LINEARS' order: the order the adapter's files list them."""
    order = list(DRAFT_LINEARS)
    return dict(sorted(factors.items(), key=lambda kv: (kv[0][0], order.index(kv[0][1]))))


def previous_runs(checkpoint_dir: Path) -> list[dict]:
    """The logs of the runs a continued adapter already went through, oldest first (without their
    per-step history), so the last log tells the adapter's whole training."""
    import json

    path = checkpoint_dir / ADAPTER_DIR / "training_log.json"
    try:
        log = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [*log.get("previous", []), {k: v for k, v in log.items() if k not in ("history", "previous")}]


def merged_for_eval(model: NLDModel, factors: Factors, scale: float) -> None:
    """Merge the factors as they will be stored (bf16), so the estimate is that of the written files."""
    from trimode.checkpoint import merge_draft_adapter

    merge_draft_adapter(
        model,
        {key: (a.detach().to(torch.bfloat16), b.detach().to(torch.bfloat16)) for key, (a, b) in factors.items()},
        scale,
    )


def lr_at(step: int, s: DraftSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def new_optimizer(loras: list[DraftLoRA], s: DraftSettings) -> torch.optim.Optimizer:
    """AdamW over every LoRA's A and B (one parameter group)."""
    return torch.optim.AdamW(
        [p for lora in loras for p in (lora.a, lora.b)], lr=s.lr, betas=(0.9, 0.99), weight_decay=0.0
    )


def train_step(
    model: NLDModel,
    loras: list[DraftLoRA],
    optim: torch.optim.Optimizer,
    seqs: torch.Tensor,
    step: int,
    L: int,
    quadratic: bool,
    s: DraftSettings,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step on blocks of length L (linear or quadratic rows) at random offsets of seqs
    (prompts + greedy continuations). -> (loss, accepted length per block [b, K], the blocks' starts [b, K])."""
    for group in optim.param_groups:
        group["lr"] = lr_at(step, s)
    starts = sample_starts(len(seqs), seqs.shape[1], s.prompt_len, L, s.draft_tokens // L, generator)
    batch = draft_layout(seqs, starts, L, model.spec.mask_token_id, quadratic)
    logits = draft_logits(model, loras, batch)  # fp32: bf16 autocast made the backward 10x slower on CPU
    loss, accepted = draft_loss(logits, batch.targets, model.spec.mask_token_id, s.weighting)
    optim.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(optim.param_groups[0]["params"], 1.0)
    optim.step()
    return loss, accepted, starts


def check_finite(loras: list[DraftLoRA], keys: list[tuple[int, str]], step: int, s: DraftSettings) -> None:
    """Stop at the step a factor turns NaN or inf (as stored, in bf16): written, it would only fail
    later, as non-finite logits at generation."""
    parts = [(key, ab, p.detach()) for key, lora in zip(keys, loras) for ab, p in (("A", lora.a), ("B", lora.b))]
    is_finite = torch.stack([torch.isfinite(p.to(torch.bfloat16)).all() for _, _, p in parts])
    if not is_finite.all():  # one sync per step; the culprit only on failure
        (i, name), ab, _ = parts[int((~is_finite).nonzero()[0])]
        tensor = f"layers.{i}.{DRAFT_LINEARS[name]}.{name}.lora_{ab}"
        raise NumericalError(
            f"step {step + 1} of {s.steps}: LoRA tensor {tensor} became non-finite (NaN or inf); "
            f"nothing was written. Lower --lr (got {s.lr:g})"
        )


def train_draft(
    checkpoint_dir: Path,
    out_dir: Path,
    settings: DraftSettings = DraftSettings(),
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Train the draft adapter of checkpoint_dir; write base files + linear_spec_lora/ to out_dir. -> the log."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    check_paths(checkpoint_dir, out_dir, force)
    ck = load_checkpoint(checkpoint_dir, dtype=torch.float32, draft_adapter=False)
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    start = starting_adapter(ck, settings, generator)
    scale = start.alpha / start.rank
    stream, source = token_stream(ck, settings.data)
    stream, eval_prompts = validation_prompts(ck, stream, settings)
    if len(stream) <= settings.prompt_len:
        raise InputError(f"--data: {len(stream)} tokens of text, need more than --prompt-len {settings.prompt_len}")

    model = ck.model
    before = {}
    eval_modes = tuple(Mode(m) for m in settings.modes)
    if eval_prompts:
        if start.is_continued:
            merged_for_eval(model, start.factors, scale)
        before = held_out_acceptance(model, eval_prompts, settings.block_lengths, eval_modes)
    loras = install_lora(model, start.factors, scale)
    optim = new_optimizer(loras, settings)
    log: dict = {
        "settings": {**asdict(settings), "data": str(settings.data) if settings.data else None},
        "base_checkpoint": str(checkpoint_dir),
        "source": source,
        "num_train_tokens": len(stream),
        "rank": start.rank,
        "alpha": start.alpha,
        "continued": start.is_continued,
        "modules": list(dict.fromkeys(name for _, name in start.factors)),
        "num_trainable_params": sum(lora.a.numel() + lora.b.numel() for lora in loras),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "history": [],
        "previous": previous_runs(ck.checkpoint_dir) if start.is_continued else [],
    }
    pool = TargetPool(model, stream, settings, generator)
    bar = _progress(settings.steps, progress)
    began = time.perf_counter()
    recent: list[list[int]] = []  # the last 20 steps' runtime-path accepted lengths
    rounds = [(mode, L) for mode in settings.modes for L in settings.block_lengths]
    try:
        for step in range(settings.steps):
            mode, L = rounds[step % len(rounds)]
            loss, accepted, starts = train_step(
                model, loras, optim, pool.take(settings.batch_size), step, L, mode == "quadratic", settings, generator
            )
            check_finite(loras, list(start.factors), step, settings)
            mean_acc = accepted.float().mean().item()
            path = path_acceptance(starts, accepted, settings.prompt_len)
            log["history"].append(
                {
                    "step": step,
                    "mode": mode,
                    "block_length": L,
                    "loss": round(loss.item(), 5),
                    "accepted": round(mean_acc, 4),
                    "accepted_path": round(sum(path) / len(path), 4) if path else None,
                }
            )
            recent = (recent + [path])[-20:]
            num = sum(map(len, recent))
            bar.set_postfix(
                L=L, loss=f"{loss.item():.3f}", accepted=f"{sum(map(sum, recent)) / num:.2f}" if num else "-"
            )
            bar.update()
    finally:
        bar.close()  # also on an error: its line ends, so the CLI's Error line starts its own
    log["wall_time_s"] = round(time.perf_counter() - began, 1)
    factors = {key: (lora.a.detach(), lora.b.detach()) for key, lora in zip(start.factors, loras)}
    if eval_prompts:
        merged_for_eval(model, factors, scale)
        log["held_out_acceptance"] = {
            "before": before,
            "after": held_out_acceptance(model, eval_prompts, settings.block_lengths, eval_modes),
            "num_prompts": len(eval_prompts),
            "max_new_tokens": 64,
        }
    from trimode.stage_output import stage_output

    with stage_output(out_dir, STAGE, [checkpoint_dir], force) as tmp:
        write_checkpoint(tmp, checkpoint_dir, factors, start.alpha, log)
    return log


def write_checkpoint(tmp: Path, checkpoint_dir: Path, factors, alpha: float, log: dict) -> None:
    """The base checkpoint's files (copied; any old adapter left out) + linear_spec_lora/ in PEFT
    format + this stage's manifest.json (replacing the base's)."""
    import json
    import shutil

    from trimode import __version__
    from trimode.make_checkpoint import write_draft_adapter
    from trimode.stage_output import input_digest, write_manifest

    shutil.copytree(checkpoint_dir, tmp, ignore=shutil.ignore_patterns(ADAPTER_DIR, ".*"), dirs_exist_ok=True)
    write_draft_adapter(tmp / ADAPTER_DIR, factors, alpha)
    (tmp / ADAPTER_DIR / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    write_manifest(
        tmp,
        {
            "stage": STAGE,
            "tool": f"trimode {__version__}",
            "input": {"path": str(checkpoint_dir), "digest_sha256": input_digest(checkpoint_dir)},
            "rank": log["rank"],
            "alpha": log["alpha"],
            "settings": log["settings"],
            "held_out_acceptance": log.get("held_out_acceptance"),
        },
    )


def _progress(total: int, enabled: bool):
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc="train-draft", disable=not enabled, dynamic_ncols=True, file=sys.stderr)
