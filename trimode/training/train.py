"""Train a small tri-mode checkpoint on the standard library (spec §9) and write it in the NLD layout.

    python -m trimode.training.train --out trimode/assets/default

Seeded and CPU-sized: the published recipe (continue an AR model on L_AR + 0.3 L_diff) from scratch.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import click
import torch

from trimode import __version__
from trimode.chat import DEFAULT_CHAT_TEMPLATE
from trimode.checkpoint import load_checkpoint
from trimode.cli.common import SEED, FiniteFloat
from trimode.config import ModelSpec, RopeSpec
from trimode.errors import TrimodeError
from trimode.make_checkpoint import SPECIAL_TOKENS, save_weights, write_tokenizer
from trimode.model import NLDModel
from trimode.stage_output import stage_output, write_manifest
from trimode.training.corpus import document_stream, read_texts, split_files
from trimode.training.objective import joint_loss

FIXTURE_SPEC = ModelSpec(
    vocab_size=3072,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    mask_token_id=SPECIAL_TOKENS.index("<mask>"),
    eos_token_ids=(SPECIAL_TOKENS.index("</s>"),),
    bos_token_id=SPECIAL_TOKENS.index("<s>"),
    pad_token_id=SPECIAL_TOKENS.index("<pad>"),
    max_position_embeddings=262144,
    block_size=8,
    rope=RopeSpec(),  # the published YaRN parameters
)


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    alpha: float = 0.3
    # Block sizes cycled over steps, so one checkpoint drafts well at every block length we serve.
    block_sizes: tuple[int, ...] = (4, 8, 16, 32)
    use_bf16_autocast: bool = True  # ~2x faster on CPUs with AVX512-BF16; master weights stay fp32
    seed: int = 0
    init_from: str | None = None  # continue a checkpoint trained here (its tokenizer and weights)
    num_files: int | None = None  # a corpus slice (tests)


def encode_corpus(tokenizer, texts: list[str], spec: ModelSpec) -> torch.Tensor:
    docs = [enc.ids for enc in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return document_stream(docs, spec.bos_token_id, spec.eos_token_ids[0])


def sample_batch(stream: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def init_model(spec: ModelSpec, generator: torch.Generator) -> NLDModel:
    model = NLDModel(spec)
    for name, p in model.named_parameters():
        with torch.no_grad():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
    return model


def lr_at(step: int, s: TrainSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    out_dir: Path, settings: TrainSettings, spec: ModelSpec = FIXTURE_SPEC, force: bool = False, progress: bool = True
) -> dict:
    """Train and write the checkpoint into out_dir through `stage_output` (force replaces only a previous
    train output). -> the training log."""
    inputs = [settings.init_from] if settings.init_from else []
    with stage_output(out_dir, "train", inputs, force) as tmp:
        log = _train_into(tmp, settings, spec, progress)
        write_manifest(
            tmp,
            {
                "stage": "train",
                "tool": f"trimode {__version__}",
                "settings": asdict(settings),
                "python": platform.python_version(),
                "torch": torch.__version__,
            },
        )
    return log


def _train_into(tmp: Path, settings: TrainSettings, spec: ModelSpec, progress: bool) -> dict:
    from tokenizers import Tokenizer

    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)

    train_files, held_files = split_files()
    train_files = train_files[: settings.num_files] if settings.num_files else train_files
    previous = None
    if settings.init_from:
        init_dir = Path(settings.init_from)
        base = load_checkpoint(init_dir, dtype=torch.float32)
        spec, model = base.spec, base.model.requires_grad_(True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(init_dir / name, tmp / name)
        previous = json.loads((init_dir / "training_log.json").read_text())
        previous.pop("history", None)
    else:
        write_tokenizer(tmp, spec.vocab_size, read_texts(train_files), DEFAULT_CHAT_TEMPLATE)  # the embedded one's
    tokenizer = Tokenizer.from_file(str(tmp / "tokenizer.json"))
    spec = replace(spec, vocab_size=max(spec.vocab_size, tokenizer.get_vocab_size()))
    stream = encode_corpus(tokenizer, read_texts(train_files), spec)
    held = encode_corpus(tokenizer, read_texts(held_files), spec)

    if not settings.init_from:
        model = init_model(spec, generator)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.95),
    )
    log: dict = {
        "settings": asdict(settings),
        "python": platform.python_version(),
        "num_train_tokens": len(stream),
        "num_held_out_tokens": len(held),
        "num_train_files": len(train_files),
        "num_params": sum(p.numel() for p in model.parameters()),
        "previous": previous,
        "history": [],
    }
    start = time.perf_counter()
    bar = _progress(settings.steps, progress)
    model.train()
    for step in range(settings.steps):
        for group in optim.param_groups:
            group["lr"] = lr_at(step, settings)
        batch = sample_batch(stream, settings.batch_size, settings.seq_len, generator)
        block_size = settings.block_sizes[step % len(settings.block_sizes)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.use_bf16_autocast):
            losses = joint_loss(model, batch, block_size, settings.alpha, generator)
        optim.zero_grad(set_to_none=True)
        losses.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        row = {
            "step": step,
            "block_size": block_size,
            "loss": losses.total.item(),
            "ar": losses.ar.item(),
            "diffusion": losses.diffusion.item(),
        }
        log["history"].append(row)
        bar.set_postfix(ar=f"{row['ar']:.3f}", diff=f"{row['diffusion']:.3f}")
        bar.update()
    bar.close()
    log["wall_time_s"] = round(time.perf_counter() - start, 1)

    state = {n: t.detach().to(torch.bfloat16).contiguous() for n, t in model.state_dict().items()}
    (tmp / "config.json").write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    save_weights(state, tmp, 1)
    (tmp / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    return log


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="train", disable=not enabled, dynamic_ncols=True)


@click.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
@click.option("--steps", type=click.IntRange(min=1), default=TrainSettings.steps, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=TrainSettings.batch_size, show_default=True)
@click.option("--seq-len", type=click.IntRange(min=16), default=TrainSettings.seq_len, show_default=True)
@click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=TrainSettings.lr, show_default=True)
@click.option(
    "--alpha",
    type=FiniteFloat(min=0),
    default=TrainSettings.alpha,
    show_default=True,
    help="Weight of the diffusion loss (0.3 as published).",
)
@click.option("--seed", type=SEED, default=TrainSettings.seed, show_default=True)
@click.option("--warmup", type=click.IntRange(min=1), default=TrainSettings.warmup, show_default=True)
@click.option(
    "--init-from",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Continue training a checkpoint written by this command (same tokenizer).",
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch.set_num_threads")
@click.option("--force", is_flag=True, help="Replace a previous training output (never another folder).")
def main(
    out_dir: Path,
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    alpha: float,
    seed: int,
    warmup: int,
    init_from: str | None,
    threads: int | None,
    force: bool,
) -> None:
    """Train the small tri-mode fixture checkpoint on the Python standard library."""
    if threads:
        torch.set_num_threads(threads)
    settings = TrainSettings(
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        alpha=alpha,
        seed=seed,
        warmup=warmup,
        init_from=init_from,
    )
    try:
        log = train(out_dir, settings, force=force)
    except TrimodeError as e:
        raise click.ClickException(str(e)) from None
    last = log["history"][-1]
    click.echo(
        f"wrote {out_dir}: {log['num_params']} params, {steps} steps in {log['wall_time_s']} s, "
        f"AR loss {last['ar']:.3f}, diffusion loss {last['diffusion']:.3f}"
    )


if __name__ == "__main__":
    main()
