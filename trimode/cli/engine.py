"""`trimode build` and `trimode inspect`: engine dirs (the builder stage)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from trimode.cli.common import DeviceType, IntList, echo_json, resolve_checkpoint_dir

ENGINE_OPTIONS = [  # build's and deploy's: what an engine is built for
    click.option(
        "--backend",
        type=click.Choice(["torch", "onnx", "tensorrt"]),
        default="torch",
        show_default=True,
        help="torch: AOTInductor programs (CPU or CUDA); onnx: onnxruntime (CPU, proves the TensorRT "
        "graph); tensorrt: GPU hosts with TensorRT.",
    ),
    click.option(
        "--max-batch-size",
        type=click.IntRange(1, 4096),
        default=8,
        show_default=True,
        help="Sequences in flight at once.",
    ),
    click.option(
        "--max-seq-len",
        type=click.IntRange(2, 1 << 20),
        default=1024,
        show_default=True,
        help="Prompt + generated tokens + one block, per sequence.",
    ),
    click.option(
        "--max-input-len",
        type=click.IntRange(1, 1 << 20),
        default=256,
        show_default=True,
        help="The prefill chunk: longer prompts are prefilled in chunks of this many tokens.",
    ),
    click.option(
        "--block-lengths",
        type=IntList(),
        default=None,
        help="Block lengths the engine serves (diffusion, self-spec) [default: the checkpoint's block_size].",
    ),
    click.option(
        "--kv-block-size",
        type=click.IntRange(1, 1 << 20),
        default=16,
        show_default=True,
        help="Positions per KV cache block (--max-seq-len or more: one dense block per sequence).",
    ),
    click.option(
        "--kv-cache-memory",
        default=None,
        help="The KV cache's memory: bytes (2GiB, 512MiB) or a fraction of the device's free memory (0.9) "
        "[default: room for --max-batch-size sequences of --max-seq-len].",
    ),
    click.option("--device", type=DeviceType(), default="cpu", show_default=True, help="cpu or cuda."),
]


def engine_options(command):
    for option in reversed(ENGINE_OPTIONS):
        command = option(command)
    return command


class ProgramBar:
    """A progress bar over the programs a build compiles (build_engine's on_start and on_program)."""

    def __init__(self, backend: str, quiet: bool):
        self.backend, self.quiet = backend, quiet
        self.bar: Any = None  # a tqdm bar once the shapes are known

    def start(self, shapes) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=len(shapes), desc=f"build {self.backend}", unit="program", disable=self.quiet, file=sys.stderr
        )

    def update(self, shape) -> None:
        self.bar.set_postfix_str(shape.name)
        self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@click.command()
@click.argument("checkpoint_dir", required=False, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="The engine dir to write.")
@engine_options
@click.option(
    "--onnx-only",
    is_flag=True,
    help="With --backend tensorrt: export and check the ONNX graphs, stop before TensorRT (what a CPU machine can do).",
)
@click.option("--force", is_flag=True, help="Replace a previous build output (never another folder).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def build(
    checkpoint_dir: Path | None,
    out_dir: Path,
    backend: str,
    max_batch_size: int,
    max_seq_len: int,
    max_input_len: int,
    block_lengths: tuple[int, ...] | None,
    kv_block_size: int,
    kv_cache_memory: str | None,
    device: str,
    onnx_only: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Build an engine dir from CHECKPOINT_DIR (default: the embedded checkpoint).

    Compiles one program per pass shape the three modes run (prefill chunk, AR token, and per
    block length the denoise, draft and verify passes), checks that the engine gives the eager
    reference's tokens in every mode, and writes manifest.json with the library versions, device,
    settings, file digests and that self-test. Loading the engine dir checks them all again.
    """
    from trimode.builder import BuildSettings, build_engine

    settings = BuildSettings(
        backend=backend,
        max_batch_size=max_batch_size,
        max_seq_len=max_seq_len,
        max_input_len=max_input_len,
        block_lengths=block_lengths or (),
        device=device.split(":")[0],
        onnx_only=onnx_only,
        kv_block_size=kv_block_size,
        kv_cache_memory=kv_cache_memory,
    )
    bar = ProgramBar(backend, as_json)
    try:
        manifest = build_engine(resolve_checkpoint_dir(checkpoint_dir), out_dir, settings, force, bar.start, bar.update)
    finally:
        bar.close()
    if as_json:
        echo_json(manifest)
        return
    click.echo(
        f"wrote {out_dir}: {backend} engine, {len(manifest['programs'])} programs in "
        f"{manifest['build_seconds']} s; self-test equals the eager reference in every mode"
    )


@click.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the manifest as JSON (with what `trimode bench --save-step-times` stored, under step_times).",
)
def inspect(engine_dir: Path, as_json: bool) -> None:
    """Print ENGINE_DIR's manifest: backend, settings, programs, device, versions, self-test, and the
    step times auto starts from.

    Reads only the manifest and the saved step times (no check of the other files: loading the
    engine does that)."""
    from trimode.builder.engine_dir import read_step_times
    from trimode.builder.manifest import read_manifest

    manifest = read_manifest(engine_dir)
    saved = read_step_times(engine_dir, manifest)
    if as_json:
        echo_json({**manifest, **({"step_times": saved} if saved else {})})
        return
    click.echo(format_manifest(manifest, saved))


def describe_graph(m: dict) -> str | None:
    """Which ONNX graph an onnx or tensorrt engine holds and what it is for (None for torch)."""
    backend, onnx_only = m["settings"]["backend"], m["settings"].get("onnx_only")
    if backend == "tensorrt":
        return "plugin graphs (attention as trimode::BlockAttention nodes), TensorRT's input" + (
            ": exported and checked, no TensorRT engines built" if onnx_only else ", built with our AOT plugins"
        )
    if backend != "onnx":
        return None
    section = m.get("backend") or {}
    if section.get("graph") != "native":  # an onnx engine built before the native graphs
        return (
            "plugin graphs (trimode::BlockAttention nodes run by the torch references through "
            "onnxruntime-extensions): the CPU check of TensorRT's graph, slow (the pool in and out per node)"
        )
    session = section.get("session") or {}
    threads = session.get("intra_op_num_threads", "?")
    return (
        "native (standard ONNX operators, attention pattern from indices), run by onnxruntime: the CPU "
        f"engine; the pool read in place, the chunk's K/V written back; threads {threads}, "
        f"spinning {session.get('allow_spinning', '?')}"
    )


def describe_auto(m: dict, saved: dict | None) -> str | None:
    """The step times auto starts from (ms per step by batch size): saved by `trimode bench`, else the
    build's; None for an engine without them."""
    if saved is None and "auto" not in m:
        return None
    seconds = saved["seconds"] if saved else m["auto"]["seconds"]
    times = "; ".join(
        f"{mode} " + ", ".join(f"b{size} {t * 1e3:.2f}" for size, t in sorted(by_size.items(), key=lambda i: int(i[0])))
        for mode, by_size in seconds.items()
    )
    if saved is None:
        return f"ms per step at build: {times}"
    about = saved.get("measured", {})
    machine = about.get("machine", {})
    when = f"{about.get('date', '?')}, {machine.get('cpu', '?')}, threads {machine.get('torch_threads', '?')}"
    return f"ms per step measured by trimode bench ({when}; what it did not run: the build's, scaled): {times}"


def format_manifest(m: dict, saved: dict | None = None) -> str:
    s, d, c, kv = m["settings"], m["device"], m["model"]["config"], m["kv_cache"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    programs = ", ".join(p["name"] for p in m["programs"])
    backend = m.get("backend") or {}
    files = set(backend.get("programs", {}).values())
    if files and len(files) < len(m["programs"]):  # torch: one block program serves three passes
        programs += f" ({len(files)} compiled)"
    if backend.get("batch1_programs"):  # torch on a CPU fp32 model
        programs += f"; batch-1 copies of {', '.join(sorted(set(backend['batch1_programs'].values())))}"
    for name, why in (backend.get("batch1_skipped") or {}).items():  # where autotuning kept MKL everywhere
        programs += f"; no batch-1 copy of {name} ({why})"
    quant = (m.get("quantization") or {}).get("quantization", {}).get("quant_algo") if m.get("quantization") else None
    lines = [
        f"engine     {m['tool']}, format {m['format']}, built in {m['build_seconds']} s",
        f"backend    {s['backend']}{' (ONNX only)' if s['onnx_only'] else ''} on {d['type']} "
        f"({', '.join(f'{k} {v}' for k, v in d.items() if k != 'type')})",
        f"model      {c.get('model_type')}, {c.get('num_hidden_layers')} layers, hidden {c.get('hidden_size')}, "
        f"vocab {c.get('vocab_size')}, {m['model']['dtype']}"
        f"{', FP8 ' + str(quant) if quant else ''}{', draft adapter' if m['model']['has_draft_adapter'] else ''}",
        f"limits     max_batch_size {s['max_batch_size']}, max_seq_len {s['max_seq_len']}, "
        f"max_input_len {s['max_input_len']}, block lengths {', '.join(map(str, s['block_lengths']))}",
        f"kv cache   {kv['num_blocks']} blocks of {kv['block_size']} positions, {kv['dtype']}, "
        f"{kv['bytes']} bytes ({kv['bytes'] / (1 << 20):.1f} MiB)"
        f"{', from --kv-cache-memory ' + s['kv_cache_memory'] if s.get('kv_cache_memory') else ''}",
        f"programs   {programs}",
        *([f"graph      {graph}"] if (graph := describe_graph(m)) else []),
        f"input      {m['input']['path']} (sha256 {m['input']['digest_sha256'][:12]}...)",
        f"versions   {versions}",
        f"self-test  {m['self_test']['max_new_tokens']} tokens x {len(m['self_test']['prompts'])} prompts per mode, "
        f"block {m['self_test']['block_length']}: "
        + json.dumps({k: v[0][:6] for k, v in m["self_test"]["tokens"].items()}),
        *([f"auto       {auto}"] if (auto := describe_auto(m, saved)) else []),
        f"files      {len(m['files'])}, digest {m['digest_sha256'][:12]}...",
    ]
    return "\n".join(lines)
