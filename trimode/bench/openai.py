"""The bench target for an OpenAI-compatible server (`trimode serve --openai-port`, or any other):
streamed /v1/completions read as server-sent events with plain urllib, one model per mode.

Per the OpenAI completions API: `stream: true` gives `data: {...}` chunks with choices[0].text,
then `data: [DONE]`; `stream_options.include_usage` adds a last chunk whose `usage.completion_tokens`
is the true token count (without it, each text chunk counts as one token). Forward passes are not
part of that API, so tokens per pass is not reported here. `ignore_eos` and `block_length` are
sent as extra body fields (vLLM's spelling for the first); a server that ignores them still runs.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

from trimode.bench.targets import Ask, BenchError, Update, served_pass_seconds
from trimode.passes import Mode


class OpenAITarget:
    kind = "openai"
    slots = None
    default_block_length = None

    def __init__(self, base_url: str, prefix: str = "", timeout_s: float = 300.0, metrics_url: str | None = None):
        self.base = base_url.rstrip("/").removesuffix("/v1")
        self.prefix, self.timeout_s, self.metrics_url = prefix, timeout_s, metrics_url

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "url": self.base,
            "prefix": self.prefix,
            "slots": None,
            "metrics_url": self.metrics_url,
        }

    def pass_seconds(self) -> float | None:
        return served_pass_seconds(self.metrics_url, self.prefix)

    def model(self, mode: Mode) -> str:
        from trimode.triton_repo.client import model_name

        return model_name(mode, self.prefix)

    def check(self, modes: list[Mode]) -> None:
        try:
            with urllib.request.urlopen(f"{self.base}/v1/models", timeout=10) as response:
                served = {m["id"] for m in json.loads(response.read())["data"]}
        except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as e:
            raise BenchError(
                f"--openai {self.base}: no OpenAI-compatible server answers /v1/models there "
                f"({getattr(e, 'reason', e)})"
            ) from None
        missing = [self.model(m) for m in modes if self.model(m) not in served]
        if missing:
            raise BenchError(f"--openai {self.base}: no model {missing[0]!r} (it serves {', '.join(sorted(served))})")

    def stream(self, ask: Ask) -> Iterator[Update]:
        body = {
            "model": self.model(ask.mode),
            "prompt": ask.prompt,
            "max_tokens": ask.max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        body |= {"ignore_eos": True} if ask.ignore_eos else {}
        body |= {"block_length": ask.block_length} if ask.block_length and ask.mode is not Mode.AR else {}
        request = urllib.request.Request(
            f"{self.base}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        count = 0
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                for line in response:
                    data = line.decode().strip().removeprefix("data:").strip()
                    if not line.startswith(b"data:") or not data:
                        continue
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("usage"):
                        count = chunk["usage"]["completion_tokens"]
                    elif chunk.get("choices") and chunk["choices"][0].get("text"):
                        count += 1
                        yield Update(count)
        except urllib.error.HTTPError as e:
            raise BenchError(f"{body['model']}: HTTP {e.code}: {e.read().decode(errors='replace')[:300]}") from None
        yield Update(count, is_final=True)

    def close(self) -> None:
        pass
