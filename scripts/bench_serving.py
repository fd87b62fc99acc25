"""Benchmark serving: tokens/s through `trimode serve` (Triton, the mode's ensemble) vs in-process.

One engine dir, one run, the same prompts: per mode (ar, diffusion, self-spec) and concurrency
(default 1 and 8), at temperature 0 with end_id -1 (every request makes max_tokens):
  * in-process: `load_engine(ENGINE_DIR).new_engine()` + `trimode.decoding.generate` over the first
    c prompts (one batch, as the engine model would run them);
  * served: c clients, each one request of one prompt sent at once (gRPC, stream false), timed
    from the first send to the last answer, through a real tritonserver on 127.0.0.1 over a
    repository written from the same engine dir (the server loads the engine once, before timing);
  * openai: the same through the OpenAI front end (`serve --openai-port`, in this process: POST
    /v1/completions, temperature 0, ignore_eos), which calls the same ensemble over gRPC;
  * tokens/s = generated tokens / best wall time over --repeats, round-robin with the in-process
    run so load from other jobs hits both alike; served / in-process is the ratio to read
    (1 - ratio: the serving overhead), openai / served the front end's own overhead, and served
    text == in-process text == openai text is checked.
Run:   .venv/bin/python scripts/bench_serving.py --engine ENGINE_DIR --json out/bench_serving.json
       --threads 1 sets torch's threads here and OMP_NUM_THREADS for the server (fair on a loaded box).
The JSON goes to stdout and --json, a table to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_modes import PROMPTS, add_rates, mode_ratios, time_interleaved, write_report  # noqa: E402

from trimode.builder.engine_dir import load_engine  # noqa: E402
from trimode.decoding import GenerationSettings, Mode, generate  # noqa: E402
from trimode.triton_repo import client  # noqa: E402
from trimode.triton_repo.openai_api import OpenAIFrontend  # noqa: E402
from trimode.triton_repo.server import Ports, TritonServer  # noqa: E402
from trimode.triton_repo.writer import write_model_repo  # noqa: E402


def served(url: str, model: str, prompts: list[str], max_tokens: int) -> list[dict]:
    """All prompts at once, one client thread each -> their results, in prompt order."""
    return at_once(
        lambda p: client.infer(url, model, {"text_input": p, "max_tokens": max_tokens, "end_id": -1}), prompts
    )


def via_openai(endpoint: str, model: str, prompts: list[str], max_tokens: int) -> list[dict]:
    """The same through the OpenAI front end: text and num_output_tokens of each completion."""

    def complete(prompt: str) -> dict:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        request = urllib.request.Request(
            f"{endpoint}/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=600) as response:
            answer = json.loads(response.read())
        return {"text": answer["choices"][0]["text"], "num_output_tokens": answer["usage"]["completion_tokens"]}

    return at_once(complete, prompts)


def at_once(call, prompts: list[str]) -> list[dict]:
    """call(prompt) for every prompt at once, one thread each -> the results in prompt order."""
    results: list[dict | BaseException | None] = [None] * len(prompts)

    def send(i: int) -> None:
        try:
            results[i] = call(prompts[i])
        except BaseException as e:  # noqa: BLE001 (re-raised below, in the caller's thread)
            results[i] = e

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if not isinstance(r, dict):
            raise RuntimeError(f"{r!r}")
    return results  # type: ignore[return-value]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", type=Path, required=True, help="a built engine dir (trimode build)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,8", help="comma-separated, each <= %d" % len(PROMPTS))
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (best used, median reported)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads here, OMP_NUM_THREADS for the server")
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the server inherits it (its stubs run torch)
    levels = [int(c) for c in args.concurrency.split(",")]
    built = load_engine(args.engine)
    ck, n, block_length = built.checkpoint, args.max_new_tokens, built.block_lengths[0]
    if max(levels) > min(len(PROMPTS), built.config.max_slots):
        ap.error(f"--concurrency: at most {min(len(PROMPTS), built.config.max_slots)} for this engine")
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "num_threads": torch.get_num_threads(),
            "date": datetime.datetime.now().isoformat(),
        },
        "engine": {"dir": str(args.engine), "settings": built.manifest["settings"]},
        "settings": {
            "max_new_tokens": n,
            "repeats": args.repeats,
            "block_length": block_length,
            "protocol": "grpc, stream false",
            "temperature": 0.0,
        },
        "results": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        repo = write_model_repo(args.engine, Path(tmp) / "repo")
        with (
            TritonServer(repo, ports=Ports.free(), log_path=Path(tmp) / "tritonserver.log") as server,
            OpenAIFrontend(repo, server.endpoints["grpc"], port=Ports.free().http) as frontend,
        ):
            url = server.endpoints["grpc"]
            for c in levels:
                texts, row, fns = PROMPTS[:c], {}, {}
                prompts = [ck.tokenizer.encode(t) for t in texts]
                same = {}
                for mode in Mode:
                    settings = GenerationSettings(
                        mode=mode, max_new_tokens=n, block_length=block_length, ignore_eos=True
                    )
                    local = lambda settings=settings, prompts=prompts: generate(  # noqa: E731
                        ck.model, prompts, settings, built.new_engine()
                    )
                    remote = lambda mode=mode, texts=texts: served(url, client.model_name(mode), texts, n)  # noqa: E731
                    openai = lambda mode=mode, texts=texts: via_openai(  # noqa: E731
                        frontend.endpoint, client.model_name(mode), texts, n
                    )
                    seqs, answers, completions = local(), remote(), openai()  # the warm-ups, and what to compare
                    texts_local = [ck.tokenizer.decode(s.tokens) for s in seqs]
                    same[mode.value] = texts_local == [a["text"] for a in answers] == [a["text"] for a in completions]
                    row[f"{mode.value}/in_process"] = {"tokens_generated": sum(s.stats.num_generated for s in seqs)}
                    row[f"{mode.value}/served"] = {"tokens_generated": sum(a["num_output_tokens"] for a in answers)}
                    row[f"{mode.value}/openai"] = {"tokens_generated": sum(a["num_output_tokens"] for a in completions)}
                    fns[f"{mode.value}/in_process"], fns[f"{mode.value}/served"] = local, remote
                    fns[f"{mode.value}/openai"] = openai
                for key, timing in time_interleaved(fns, args.repeats).items():
                    add_rates(row[key], timing)
                row["served_vs_in_process"] = mode_ratios(row, "served", "in_process")
                row["openai_vs_served"] = mode_ratios(row, "openai", "served")
                row["served_text_equals_in_process"] = same
                report["results"][f"concurrency_{c}"] = row
    print_table(report)
    write_report(report, args.json)
    return 0


def print_table(report: dict) -> None:
    err = sys.stderr
    print(
        f"{'':<16}{'mode':<11}{'in-process tok/s':>17}{'served tok/s':>14}{'served/in-process':>19}"
        f"{'openai tok/s':>14}{'openai/served':>15}  same text",
        file=err,
    )
    for key, row in report["results"].items():
        for m in Mode:
            print(
                f"{key:<16}{m.value:<11}{row[f'{m.value}/in_process']['tokens_per_s']:>17}"
                f"{row[f'{m.value}/served']['tokens_per_s']:>14}{row['served_vs_in_process'][m.value]:>19}"
                f"{row[f'{m.value}/openai']['tokens_per_s']:>14}{row['openai_vs_served'][m.value]:>15}"
                f"  {row['served_text_equals_in_process'][m.value]}",
                file=err,
            )


if __name__ == "__main__":
    sys.exit(main())
