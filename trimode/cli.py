"""The trimode command line. Each command reads options, builds settings, calls one function, prints."""

from __future__ import annotations

import json
import math
import re
import signal
import sys
import threading
import time
from pathlib import Path

import click

from trimode.errors import InputError, Interrupted, TrimodeError

EMBEDDED_CHECKPOINT = Path(__file__).parent / "assets" / "default"


class TrimodeGroup(click.Group):
    """The one exception boundary: TrimodeError becomes a one-line error and exit 1; Ctrl-C (or
    SIGTERM while a stage writes) exits 128 + the signal number (130 for Ctrl-C)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """click's own main, except that Ctrl-C anywhere in it (parsing, where a --device check imports
        torch; the instant before or after the command) exits 130 like one inside the command, not
        with click's "Aborted!" and exit 1."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        previous = _watch_ctrl_c()
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except (click.Abort, KeyboardInterrupt) as e:
            signum = getattr(e.__cause__ if isinstance(e, click.Abort) else e, "signum", 2)
            click.echo("Error: interrupted", err=True)
            sys.exit(128 + signum)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        sys.exit(code if isinstance(code, int) else 0)  # click returns the exit code of a ctx.exit(n)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            _interrupted(e)
        except Exception as e:
            if _CTRL_C:  # the Ctrl-C reached a child (a compiler, a worker) first, whose failure surfaced first
                _interrupted(Interrupted(_CTRL_C[0]))
            if not isinstance(e, TrimodeError):
                raise
            message = str(e)
            if isinstance(e, InputError) and ctx.invoked_subcommand in self.commands:
                message = _as_typed(message, self.commands[ctx.invoked_subcommand])
            raise click.ClickException(message) from None


def _interrupted(e: KeyboardInterrupt):
    click.echo("Error: interrupted", err=True)
    raise click.exceptions.Exit(128 + getattr(e, "signum", 2)) from None


# Ctrl-C signals the whole foreground process group: a child process (the C++ compiler of a build, a
# compile worker) can die of it and its caller raise that failure before Python's KeyboardInterrupt
# lands. So a Ctrl-C is recorded here, and any error after one is reported as the interrupt it is.
_CTRL_C: list[int] = []


def _watch_ctrl_c():
    """Install the SIGINT handler that records the signal; -> the previous handler (None off the main thread)."""
    def on_sigint(signum, frame):
        _CTRL_C.append(signum)
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():
        return None
    _CTRL_C.clear()
    return signal.signal(signal.SIGINT, on_sigint)


def _as_typed(message: str, command: click.Command) -> str:
    """Settings objects name their fields (max_new_tokens); say the option as typed (--max-new-tokens)."""
    for param in command.params:
        if isinstance(param, click.Option) and param.name and param.opts[0].startswith("--"):
            if "_" in param.name:
                message = re.sub(rf"(?<![\w.'-]){param.name}\b(?!')", param.opts[0], message)
            elif message.startswith(f"{param.name}:"):
                message = param.opts[0] + message[len(param.name):]
    return message


@click.group(cls=TrimodeGroup)
@click.version_option(package_name="trimode")
def main() -> None:
    """Compile and deploy tri-mode diffusion language models (AR, block diffusion, self-speculation).

    Bad input gives one "Error:" line on stderr and exit status 1 (2 for a bad option); Ctrl-C
    exits 130. Commands that write a folder write all of it or nothing (see README, Guarantees).
    """


MAX_SEED = 2**63 - 1
SEED = click.IntRange(0, MAX_SEED)


class FiniteFloat(click.FloatRange):
    """A FloatRange that also refuses nan and inf (which compare False to every bound)."""

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v


class ThresholdType(click.ParamType):
    name = "FLOAT in [0, 1]|none"

    def convert(self, value, param, ctx):
        if value is None or value == "none":
            return value
        if str(value).lower() == "none":
            return "none"
        try:
            v = float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor 'none'", param, ctx)
        if not 0 <= v <= 1:  # also refuses nan
            self.fail(f"{value!r} is not in the range 0<=x<=1", param, ctx)
        return v


class IntList(click.ParamType):
    """Comma-separated integers in [1, 65536], e.g. 4,8,16."""
    name = "N[,N...]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            values = tuple(int(x) for x in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r}: expected integers separated by commas", param, ctx)
        if not all(1 <= v <= 65536 for v in values):
            self.fail(f"{value!r}: every value must be in [1, 65536]", param, ctx)
        return values


class DeviceType(click.ParamType):
    name = "cpu|cuda|cuda:N"

    def convert(self, value, param, ctx):
        import torch

        m = re.fullmatch(r"(cpu|cuda)(?::(\d{1,4}))?", str(value))
        if m is None or (m.group(1) == "cpu" and m.group(2)):
            self.fail(f"{value!r} is not a device: expected cpu, cuda or cuda:N", param, ctx)
        if m.group(1) == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if int(m.group(2) or 0) >= count:
                self.fail(f"{value!r}: {count or 'no'} CUDA device{'s' * (count != 1)} available", param, ctx)
        return str(value)


def _check_prompts(ctx, param, prompts: tuple[str, ...]) -> tuple[str, ...]:
    from trimode.tokenizer import check_text

    for i, p in enumerate(prompts):
        try:
            check_text(p, f"prompt {i + 1}")
        except InputError as e:
            raise click.BadParameter(str(e), ctx, param) from None
    return prompts


def _echo_json(obj) -> None:
    """Strict JSON on stdout: a non-finite number (a NaN perplexity, say) is written as null."""
    def finite(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [finite(v) for v in x]
        return x

    click.echo(json.dumps(finite(obj), indent=2, allow_nan=False))


def _device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _load_engine(engine_dir: Path, checkpoint_dir: Path | None, device: str | None, **fixed):
    """A built engine dir; the options it fixes at build time (fixed: name -> value given) are refused."""
    from trimode.builder.engine_dir import load_engine

    given = [name for name, value in {"checkpoint": checkpoint_dir, **fixed}.items() if value is not None]
    if given:
        raise InputError(f"--engine and --{given[0].replace('_', '-')}: the engine dir fixes its "
                         f"{given[0].replace('_', ' ')} at build time; pass one of them")
    return load_engine(engine_dir, device)


def _checkpoint_dir(path: Path | None) -> Path:
    if path is not None:
        return path
    if (EMBEDDED_CHECKPOINT / "config.json").is_file():
        return EMBEDDED_CHECKPOINT
    raise InputError("no embedded default checkpoint in this build: pass --checkpoint DIR "
                     "(make one with: trimode make-checkpoint --random --out DIR)")


@main.command()
@click.argument("prompts", nargs=-1, required=True, callback=_check_prompts)
@click.option("--checkpoint", "checkpoint_dir", type=click.Path(path_type=Path),
              help="NLD checkpoint directory (default: the embedded checkpoint, where this build has one).")
@click.option("--engine", "engine_dir", type=click.Path(path_type=Path), default=None,
              help="Run on a built engine dir (trimode build) instead of the eager model.")
@click.option("--mode", type=click.Choice(["ar", "diffusion", "self-spec"]), default="ar", show_default=True,
              help="Generation mode; all three use the same weights.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Emit at most this many tokens.")
@click.option("--temperature", type=FiniteFloat(min=0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Sampling seed (temperature > 0).")
@click.option("--block-length", type=click.IntRange(1, 65536), default=None,
              help="Diffusion / draft block length [default: the checkpoint's block_size].")
@click.option("--threshold", type=ThresholdType(), default=None,
              help="Commit threshold: diffusion default 0.9, self-spec draft default 0 (one pass). "
                   "'none' commits an even top-k split per step (diffusion).")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=None,
              help="Prefill the prompt in chunks of this many tokens.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past EOS (benchmarks).")
@click.option("--device", type=DeviceType(), default=None, help="cpu, cuda, cuda:N [default: cuda if present].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text, tokens, statistics).")
@click.option("--url", default=None, help="HOST:PORT of a running `trimode serve`: generate there (its gRPC or "
                                          "HTTP port, see --protocol) instead of in this process.")
@click.option("--protocol", type=click.Choice(["grpc", "http"]), default="grpc", show_default=True,
              help="With --url: the server's protocol.")
@click.option("--stream", is_flag=True, help="With --url: print the text as the server streams it.")
@click.option("--chat", is_flag=True, help="Each PROMPT is a user message: apply the checkpoint's chat template "
                                           "(as the OpenAI front end does) and print the reply.")
@click.option("--chat-template", "chat_template_path", type=click.Path(path_type=Path), default=None,
              help="With --chat: a Jinja chat template to use instead of the checkpoint's.")
def generate(prompts: tuple[str, ...], checkpoint_dir: Path | None, engine_dir: Path | None, mode: str,
             max_new_tokens: int,
             temperature: float, seed: int, block_length: int | None, threshold, prefill_chunk: int | None,
             ignore_eos: bool, device: str | None, as_json: bool, url: str | None, protocol: str,
             stream: bool, chat: bool, chat_template_path: Path | None) -> None:
    """Generate from one or more PROMPTS (a batch) in the chosen mode; print text and statistics.

    At temperature 0, self-spec emits exactly the AR tokens with fewer forward passes.
    With --url, each prompt is one request to the server's ensemble for the mode.
    """
    if chat_template_path is not None and not chat:
        raise click.UsageError("--chat-template needs --chat")
    if url is not None and chat:
        raise click.UsageError("--url and --chat: chat with a server through its OpenAI front end "
                               "(trimode serve --openai-port, /v1/chat/completions)")
    if url is not None:
        remote = {"checkpoint": checkpoint_dir, "engine": engine_dir, "prefill-chunk": prefill_chunk,
                  "device": device, "threshold": threshold == "none" or None}
        given = [name for name, value in remote.items() if value]
        if given:
            raise click.UsageError(f"--url and --{given[0]}: the server fixes that")
        from trimode.cli_serve import generate_remote

        generate_remote(url, protocol, stream, prompts, mode, max_new_tokens, temperature, seed, block_length,
                        threshold, ignore_eos, as_json)
        return
    if stream:
        raise click.UsageError("--stream needs --url (a local single prompt streams anyway)")
    from trimode.checkpoint import load_checkpoint
    from trimode.decoding import GenerationSettings, engine_for
    from trimode.tokenizer import IncrementalDetokenizer

    settings = GenerationSettings(
        mode=mode, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
        block_length=block_length, threshold=None if threshold == "none" else threshold,
        use_top_k_schedule=threshold == "none", prefill_chunk=prefill_chunk, ignore_eos=ignore_eos)
    if engine_dir is not None:
        built = _load_engine(engine_dir, checkpoint_dir, device, prefill_chunk=prefill_chunk)
        ck, engine = built.checkpoint, built.new_engine()
    else:
        ck = load_checkpoint(_checkpoint_dir(checkpoint_dir), device=_device(device))
    shown_prompts = prompts
    if chat:  # the reply alone is printed; --json keeps each rendered prompt
        from trimode.chat import load_chat_template

        template = load_chat_template(ck.checkpoint_dir, chat_template_path)
        prompts = tuple(template.render([{"role": "user", "content": p}]) for p in prompts)
        shown_prompts = ("",) * len(prompts)
    encoded = [ck.tokenizer.encode(p) for p in prompts]
    if engine_dir is None:
        engine = engine_for(ck.model, encoded, settings)
    results = [engine.add(p, settings.sampling, settings.decoding) for p in encoded]
    stream = len(prompts) == 1 and not as_json
    start = time.perf_counter()
    if stream:
        click.echo(shown_prompts[0], nl=False)
    detokenizer, shown = IncrementalDetokenizer(ck.tokenizer.decode), 0
    while engine.has_work:
        engine.step()
        if stream:  # print the text as it becomes final (a character split over tokens waits)
            tokens = results[0].tokens
            click.echo(detokenizer.push(tokens[shown:]), nl=False)
            shown = len(tokens)
    elapsed = time.perf_counter() - start
    total = sum(r.stats.num_generated for r in results)
    summary = {
        "mode": settings.mode.value, "checkpoint": str(ck.checkpoint_dir), "device": str(ck.model.device),
        "batch_size": len(results), "block_length": results[0].block_length,
        "num_generated": total, "elapsed_s": round(elapsed, 4), "tokens_per_s": round(total / elapsed, 2),
        "results": [{"prompt": p, "text": ck.tokenizer.decode(r.tokens), "tokens": r.tokens,
                     "finish_reason": r.finish_reason, "stats": r.stats.to_dict()}
                    for p, r in zip(prompts, results)],
    }
    if as_json:
        _echo_json(summary)
        return
    if stream:
        click.echo(detokenizer.flush())
    else:
        for p, r in zip(shown_prompts, summary["results"]):
            click.echo(f"{p}{r['text']}")
    for i, r in enumerate(summary["results"]):
        s = r["stats"]
        accepted = f" mean_accepted={s['mean_accepted_length']:.2f}" if s["mean_accepted_length"] else ""
        click.echo(f"[{i}] {settings.mode.value}: {s['num_generated']} tokens, {s['num_passes']} passes "
                   f"{s['passes']}, {s['tokens_per_pass']:.2f} tokens/pass{accepted}, "
                   f"finish={r['finish_reason']}", err=True)
    click.echo(f"{total} tokens in {elapsed:.2f}s ({summary['tokens_per_s']} tokens/s) on {summary['device']}",
               err=True)


class CalibrationBar:
    """A progress bar over the calibration windows (quantize_checkpoint's progress), opened at the
    first calibrated batch, so that input errors print alone."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.quiet, self.bar = total, quiet, None

    def update(self, num_windows: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc="calibrate", unit="window", disable=self.quiet, file=sys.stderr)
        self.bar.update(num_windows)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@main.command()
@click.argument("checkpoint_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--kv-cache", type=click.Choice(["fp8", "none"]), default="fp8", show_default=True,
              help="Also calibrate an FP8 KV cache (k_scale / v_scale).")
@click.option("--calib-data", type=click.Path(path_type=Path), default=None,
              help="Calibration text: a file, or a folder of text files [default: built-in set].")
@click.option("--calib-samples", type=click.IntRange(1, 1 << 20), default=64, show_default=True,
              help="Calibration windows.")
@click.option("--calib-seq-len", type=click.IntRange(2, 1 << 20), default=256, show_default=True,
              help="Tokens per window.")
@click.option("--force", is_flag=True, help="Replace a previous quantize output (never another folder).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def quantize(checkpoint_dir: Path, out_dir: Path, kv_cache: str, calib_data: Path | None, calib_samples: int,
             calib_seq_len: int, force: bool, as_json: bool) -> None:
    """Quantize CHECKPOINT_DIR to FP8 (E4M3 weights and activations, FP8 KV cache) with NVIDIA ModelOpt.

    Calibrates over causal, block (masked) and draft passes, so every mode's activations are
    covered; writes a unified Hugging Face FP8 checkpoint in the NLD layout with manifest.json.
    Embeddings and diffusion_head stay bf16.
    """
    from trimode.quantize import QuantizeSettings, quantize_checkpoint

    settings = QuantizeSettings(kv_cache=kv_cache, calib_data=calib_data, calib_samples=calib_samples,
                                calib_seq_len=calib_seq_len)
    bar = CalibrationBar(calib_samples, as_json)
    try:
        path = quantize_checkpoint(checkpoint_dir, out_dir, settings, force=force, progress=bar.update)
    finally:
        bar.close()
    manifest = json.loads((path / "manifest.json").read_text())
    if as_json:
        _echo_json(manifest)
        return
    cal = manifest["calibration"]
    click.echo(f"wrote {path}: FP8 weights/activations, KV cache {kv_cache}; calibrated on "
               f"{cal['num_tokens']} tokens ({cal['passes']}) in {cal['seconds']} s")


@main.command("eval")
@click.argument("checkpoint_dir", required=False, type=click.Path(path_type=Path))
@click.option("--num-prompts", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--prompt-len", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--block-lengths", type=IntList(), default=None,
              help="Self-speculation block lengths to measure, comma-separated "
                   "[default: 4,8,16,32; with --engine, the engine's].")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--max-ppl-windows", type=click.IntRange(min=1), default=None,
              help="Perplexity over at most this many held-out windows [default: all].")
@click.option("--against", "against_dir", type=click.Path(path_type=Path), default=None,
              help="Another checkpoint (e.g. the bf16 source of an FP8 one): compare per mode.")
@click.option("--engine", "engine_dir", type=click.Path(path_type=Path), default=None,
              help="Generate through a built engine dir (perplexity stays the eager model's).")
@click.option("--against-no-adapter", is_flag=True,
              help="Compare with the same checkpoint without its draft adapter (acceptance side by side).")
@click.option("--device", type=DeviceType(), default=None, help="cpu, cuda, cuda:N [default: cuda if present].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def eval_command(checkpoint_dir: Path | None, num_prompts: int, prompt_len: int, max_new_tokens: int,
                 block_lengths: tuple[int, ...] | None, batch_size: int, max_ppl_windows: int | None,
                 against_dir: Path | None, engine_dir: Path | None, against_no_adapter: bool,
                 device: str | None, as_json: bool) -> None:
    """Evaluate CHECKPOINT_DIR (default: the embedded one) on held-out standard-library text.

    Reports AR perplexity and, per mode at temperature 0: tokens per forward pass (every pass
    counted), self-spec mean accepted length per block length, tokens/s, agreement with AR.
    With --against OTHER: the same for OTHER, the perplexity change, and per-mode greedy token
    agreement between the two. --against-no-adapter compares with the checkpoint itself, its
    linear_spec_lora/ draft adapter left out.
    """
    from trimode.checkpoint import load_checkpoint
    from trimode.evaluate import EvalSettings, evaluate

    lengths = block_lengths or (4, 8, 16, 32)
    if against_dir and against_no_adapter:
        raise InputError("--against and --against-no-adapter: pass one of them")
    new_engine = None
    if engine_dir is not None:
        built = _load_engine(engine_dir, checkpoint_dir, device)
        ck, new_engine = built.checkpoint, built.new_engine
        lengths = lengths if block_lengths is not None else built.block_lengths
    else:
        ck = load_checkpoint(_checkpoint_dir(checkpoint_dir), device=_device(device))
    if against_no_adapter and not ck.model.has_draft_adapter:
        raise InputError(f"--against-no-adapter: {ck.checkpoint_dir} has no draft adapter (linear_spec_lora/)")
    against = load_checkpoint(against_dir, device=_device(device)) if against_dir else None
    if against_no_adapter:
        against = load_checkpoint(ck.checkpoint_dir, device=_device(device), draft_adapter=False)
    settings = EvalSettings(num_prompts=num_prompts, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                            block_lengths=lengths, batch_size=batch_size, ppl_max_windows=max_ppl_windows)
    report = evaluate(ck, settings, against,
                      progress=None if as_json else lambda name: click.echo(f"... {name}", err=True),
                      new_engine=new_engine)
    if as_json:
        _echo_json(report)
        return
    click.echo(format_report(report))


def format_report(report: dict) -> str:
    lines = [f"held-out perplexity (AR): {report['perplexity']:.3f} over {report['num_held_out_tokens']} tokens",
             f"{'mode':<14}{'tok/pass':>9}{'accepted':>10}{'tok/s':>9}{'agree(AR)':>11}{'prefix':>8}"]
    for name, m in report["modes"].items():
        acc = f"{m['mean_accepted_length']:.2f}" if m["mean_accepted_length"] else "-"
        agree = f"{m['token_agreement']:.3f}" if "token_agreement" in m else "-"
        prefix = f"{m['mean_common_prefix']:.1f}" if "mean_common_prefix" in m else "-"
        lines.append(f"{name:<14}{m['tokens_per_pass']:>9.3f}{acc:>10}{m['tokens_per_s']:>9.1f}{agree:>11}{prefix:>8}")
    lines.append(f"self-spec equals AR at every block length: {report['self_spec_equals_ar']}")
    other = report.get("against")
    if other:
        adapter = "with" if other.get("draft_adapter") else "without"
        lines.append(f"against {other['checkpoint']} ({adapter} draft adapter): perplexity {other['perplexity']:.3f} "
                     f"({100 * other['perplexity_change']:+.2f}% for {report['checkpoint']})")
        lines.append(f"{'mode':<14}{'agree':>9}{'prefix':>8}{'accepted':>10}{'other acc.':>11}")
        for name, a in other["agreement"].items():
            mine, theirs = report["modes"][name]["mean_accepted_length"], other["modes"][name]["mean_accepted_length"]
            lines.append(f"{name:<14}{a['token_agreement']:>9.3f}{a['mean_common_prefix']:>8.1f}"
                         f"{(f'{mine:.2f}' if mine else '-'):>10}{(f'{theirs:.2f}' if theirs else '-'):>11}")
    return "\n".join(lines)


@main.command("train-draft")
@click.argument("checkpoint_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Output checkpoint directory: the base files plus linear_spec_lora/.")
@click.option("--rank", type=click.IntRange(1, 65536), default=None,
              help="LoRA rank [default: 64, or the input adapter's].")
@click.option("--alpha", type=FiniteFloat(min=0, min_open=True), default=None,
              help="LoRA alpha; scale = alpha / rank [default: 2 x rank].")
@click.option("--modules", default=None,
              help="Linears to adapt in every layer, comma-separated, of q_proj,k_proj,v_proj,o_proj,gate_proj,"
                   "up_proj,down_proj [default: the input adapter's, else o_proj, NVIDIA's format]. Each "
                   "adapted linear gets a merged draft copy at load time: its weights again in memory.")
@click.option("--block-length", "block_lengths", default="8", show_default=True,
              help="Draft block length(s) to train on, comma-separated, cycled over steps (e.g. 4,8,16,32).")
@click.option("--steps", type=click.IntRange(1, 10 ** 7), default=200, show_default=True)
@click.option("--lr", type=FiniteFloat(min=0, min_open=True), default=5e-3, show_default=True,
              help="Peak AdamW lr (warm-up, cosine to 10%).")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=4, show_default=True, help="Text windows per step.")
@click.option("--weighting", type=click.Choice(["accept", "ce"]), default="accept", show_default=True,
              help="accept: each block's loss up to and including its first wrong draft; ce: the whole block.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Text to continue: a file, or a folder of text files [default: the standard library "
                   "training files the embedded checkpoint was trained on].")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--num-eval-prompts", type=click.IntRange(min=0), default=16, show_default=True,
              help="Held-out prompts for the acceptance before and after (0: skip).")
@click.option("--fresh", is_flag=True, help="Ignore an adapter the input already has and start a new one.")
@click.option("--force", is_flag=True, help="Replace a previous train-draft output (never another folder).")
@click.option("--json", "as_json", is_flag=True, help="Print the training log as JSON.")
def train_draft(checkpoint_dir: Path, out_dir: Path, rank: int | None, alpha: float | None, modules: str | None,
                block_lengths: str,
                steps: int, lr: float, batch_size: int, weighting: str, data: Path | None, seed: int,
                num_eval_prompts: int, fresh: bool, force: bool, as_json: bool) -> None:
    """Train CHECKPOINT_DIR's draft adapter (linear_spec_lora/) so self-speculation accepts more per cycle.

    Self-distillation: the targets are the checkpoint's own AR greedy continuations of text windows;
    the draft pass is the runtime's (block pass over [seed, MASK...] after the adapter-off cached
    prefix, adapter on). Base weights stay frozen; only the LoRA A/B train, on every layer's o_proj
    unless --modules names more. An input that already has an adapter is continued, with new LoRAs
    on the linears --modules adds (--fresh starts a new one). Writes the base files plus
    linear_spec_lora/ (PEFT format) to --out.
    """
    from trimode.training.draft import DraftSettings, train_draft as run

    try:
        lengths = tuple(int(x) for x in block_lengths.split(","))
    except ValueError:
        raise InputError(f"--block-length: expected integers separated by commas, got {block_lengths!r}") from None
    names = None if modules is None else tuple(m.strip() for m in modules.split(",") if m.strip())
    settings = DraftSettings(rank=rank, alpha=alpha, modules=names, block_lengths=lengths, steps=steps, lr=lr,
                             batch_size=batch_size, weighting=weighting, data=data, seed=seed,
                             num_eval_prompts=num_eval_prompts, fresh=fresh)
    log = run(checkpoint_dir, out_dir, settings, force=force, progress=not as_json)
    if as_json:
        _echo_json({k: v for k, v in log.items() if k != "history"} | {"out_dir": str(out_dir)})
        return
    hist = log["history"]
    n = min(20, len(hist))
    first, last = (sum(h["loss"] for h in part) / n for part in (hist[:n], hist[-n:]))
    click.echo(f"wrote {out_dir}: {','.join(log['modules'])} at rank {log['rank']}, alpha {log['alpha']:g}, "
               f"{len(hist)} steps in "
               f"{log['wall_time_s']} s, loss {first:.3f} -> {last:.3f}")
    acc = log.get("held_out_acceptance")
    if acc:
        for L in acc["before"]:
            click.echo(f"held-out mean accepted per cycle, block {L}: {acc['before'][L]:.2f} -> {acc['after'][L]:.2f}")


@main.command("make-checkpoint")
@click.option("--random", "is_random", is_flag=True, required=True,
              help="Random weights (the only kind for now; the trained fixture ships separately).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Output directory.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--hidden-size", type=click.IntRange(16, 4096), default=64, show_default=True,
              help="A multiple of 16.")
@click.option("--num-layers", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--vocab-size", type=click.IntRange(300, 65536), default=384, show_default=True)
@click.option("--block-size", type=click.IntRange(1, 4096), default=8, show_default=True)
@click.option("--draft-adapter", is_flag=True, help="Also write a random linear_spec_lora/ draft adapter.")
@click.option("--shards", type=click.IntRange(min=1), default=1, show_default=True,
              help="Split the weights over this many safetensors files (with an index); "
                   "at most the number of tensors, 3 + 9 x layers.")
@click.option("--force", is_flag=True, help="Replace a previous make-checkpoint output (never another folder).")
def make_checkpoint(is_random: bool, out_dir: Path, seed: int, hidden_size: int, num_layers: int,
                    vocab_size: int, block_size: int, draft_adapter: bool, shards: int, force: bool) -> None:
    """Write a tiny random checkpoint in the exact NLD layout (config, weights, tokenizer)."""
    from trimode.make_checkpoint import make_random_checkpoint, tiny_spec

    if hidden_size % 16:
        raise click.BadParameter(f"expected a multiple of 16 (4 heads of an even head_dim >= 4), got {hidden_size}",
                                 param_hint="'--hidden-size'")
    if shards > 3 + 9 * num_layers:
        raise click.BadParameter(f"{shards} shards for {3 + 9 * num_layers} tensors ({num_layers} layers): "
                                 f"at most one shard per tensor", param_hint="'--shards'")
    spec = tiny_spec(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                     head_dim=hidden_size // 4, vocab_size=vocab_size, block_size=block_size)
    path = make_random_checkpoint(out_dir, spec, seed=seed, with_draft_adapter=draft_adapter,
                                  num_shards=shards, force=force)
    click.echo(f"wrote {path}")


if __name__ == "__main__":  # python -m trimode.cli: run the imported module, where every command is registered
    from trimode.cli import main as _main

    sys.exit(_main())

import trimode.cli_engine  # noqa: E402,F401  (registers build and inspect; it uses the helpers above)
import trimode.cli_serve  # noqa: E402,F401  (registers repo and serve)
import trimode.cli_deploy  # noqa: E402,F401  (registers deploy)
import trimode.cli_bench  # noqa: E402,F401  (registers bench)
