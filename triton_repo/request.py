"""One engine-model request's tensors -> what the Engine needs, or an InputError naming the input.

Every TensorRT-LLM input the ensembles accept is either honoured or refused here: beam search,
top-k/top-p filtering, penalties, logits, perf metrics and min_tokens are not in our decoders, so a
value that would need them is an error; values that ask for nothing (beam_width 1, top_p 1, ...)
pass. A request may hold several prompts (rows, TensorRT-LLM's batch > 1, decoupled repositories
only): each becomes its own Request, answered with its batch_index.
Absent exclude_input_in_output means true, as in TensorRT-LLM's documented deployments
(`exclude_input_in_output:True` in their fill_template lines).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from trimode.decoding.logprobs import MAX_LOGPROBS
from trimode.decoding.settings import DecodeConfig, SamplingParams
from trimode.errors import InputError


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    sampling: SamplingParams
    decoding: DecodeConfig
    is_stream: bool
    prepend_prompt: bool  # exclude_input_in_output = false: the final output_ids start with the prompt's
    batch_index: int = 0  # its row in a request holding several prompts


# input -> (the value that asks for nothing, what to say when another value is given)
_NEUTRAL = {
    "beam_width": (1, "beam search is not supported (beam_width must be 1)"),
    "num_return_sequences": (1, "one sequence per request (num_return_sequences must be 1); send several requests"),
    "repetition_penalty": (1.0, "repetition_penalty is not supported (must be 1)"),
    "presence_penalty": (0.0, "presence_penalty is not supported (must be 0)"),
    "frequency_penalty": (0.0, "frequency_penalty is not supported (must be 0)"),
    "return_context_logits": (False, "logits are not returned (return_context_logits must be false)"),
    "return_generation_logits": (False, "logits are not returned (return_generation_logits must be false)"),
    "return_perf_metrics": (
        False,
        "per-request performance metrics are not returned (return_perf_metrics must be false)",
    ),
}
# current TensorRT-LLM name -> its older name, which is taken too (not both)
_ALIASES = {"seed": "random_seed", "min_tokens": "min_length"}


def parse_requests(
    get: Callable[[str], np.ndarray | None],
    vocab_size: int,
    is_decoupled: bool = True,
) -> list[Request]:
    """get(name) -> the input's array (batch first) or None when the client left it out; -> one Request
    per prompt (row) of the request, each input's row b (an input with one row applies to every prompt).
    A block_length left out stays None: the engine runs its default (auto: any it runs)."""
    prompt = get("input_ids")
    if prompt is None or get("mode") is None:
        raise InputError("input_ids and mode: required (the preprocessing step writes them)")
    num_rows = prompt.shape[0] if prompt.ndim >= 1 else 1
    if num_rows > 1 and not is_decoupled:
        raise InputError(
            f"text_input: a request of {num_rows} prompts needs a streaming repository "
            f"(`trimode repo --decoupled`, as TensorRT-LLM's batch > 1 needs its decoupled mode); send one prompt "
            f"per request, the engine batches them in flight"
        )
    for name, alias in _ALIASES.items():
        if get(name) is not None and get(alias) is not None:
            raise InputError(f"{name} and {alias}: the same input under its current and its older name; send one")
    return [_parse_row(get, b, num_rows, vocab_size, is_decoupled) for b in range(num_rows)]


def _parse_row(
    get: Callable[[str], np.ndarray | None],
    row: int,
    num_rows: int,
    vocab_size: int,
    is_decoupled: bool,
) -> Request:
    def array(name: str) -> np.ndarray | None:
        a = get(name)
        if a is None and name in _ALIASES:
            a = get(_ALIASES[name])
        if a is None:
            return None
        if a.ndim == 0 or a.shape[0] not in (1, num_rows):
            raise InputError(f"{name}: {a.shape[0] if a.ndim else 0} rows for a request of {num_rows} prompts")
        return a[row if a.shape[0] > 1 else 0]

    def value(name: str, kind: type, default=None):
        a = array(name)
        if a is None:
            return default
        if a.size != 1:
            raise InputError(f"{name}: expected one value per prompt, got {a.size}")
        v = a.reshape(-1)[0]
        if kind is bool:
            return bool(v)
        if kind is int:
            return int(v)
        return float(v)

    for name, (neutral, message) in _NEUTRAL.items():
        v = value(name, type(neutral))
        if v is not None and v != neutral:
            raise InputError(f"{name}={v}: {message}")
    value("return_num_output_tokens", bool)  # accepted: num_output_tokens is in every response
    top_k, top_p = value("top_k", int, 0), value("top_p", float, 1.0)
    if top_k not in (0, 1):
        raise InputError(f"top_k={top_k}: top-k filtering is not supported (0: off, 1: greedy)")
    if not (top_p == 1.0 or top_p == 0.0):  # TensorRT-LLM reads 0 as off too
        raise InputError(f"top_p={top_p}: nucleus sampling is not supported (top_p must be 1)")
    min_tokens = value("min_tokens", int, 1)
    if min_tokens > 1:
        raise InputError(f"min_tokens={min_tokens}: not supported (every request may end at its first token)")
    max_tokens = value("max_tokens", int)
    if max_tokens is None:
        raise InputError("max_tokens: required")
    if max_tokens < 1:
        raise InputError(f"max_tokens: expected an integer >= 1, got {max_tokens}")
    temperature = value("temperature", float, 0.0)
    if not math.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature: expected a finite number >= 0, got {temperature}")
    if top_k == 1:
        temperature = 0.0  # top_k = 1 is greedy decoding
    seed = value("seed", int, 0)
    end_id = value("end_id", int)
    stops = array("stop_ids")
    stop_ids = [int(t) for t in stops.reshape(-1) if t >= 0] if stops is not None else []  # -1: padding
    if end_id is not None and end_id != -1:
        if not 0 <= end_id < vocab_size:
            raise InputError(
                f"end_id: expected -1 (never stop at EOS) or a token id in [0, {vocab_size}), got {end_id}"
            )
        stop_ids.append(end_id)
    value("pad_id", int)  # accepted: outputs are never padded
    value("length_penalty", float)  # accepted: it only weighs beams, and there is one
    threshold = value("threshold", float)
    if threshold is not None and not 0 <= threshold <= 1:  # also refuses nan
        raise InputError(f"threshold: expected a number in [0, 1], got {threshold}")
    num_top = value("num_top_log_probs", int, 0)
    if not 0 <= num_top <= MAX_LOGPROBS:
        raise InputError(f"num_top_log_probs: expected an integer in 0..{MAX_LOGPROBS}, got {num_top}")
    logprobs = num_top if value("return_log_probs", bool, False) or num_top else None
    is_stream = value("stream", bool, False)
    if is_stream and not is_decoupled:
        raise InputError(
            "stream: this repository answers whole responses only; streaming needs a repository written with "
            "`trimode repo --decoupled` (TensorRT-LLM's decoupled mode)"
        )
    ids = array("input_ids")
    assert ids is not None  # parse_requests checked it
    if ids.size == 0:
        raise InputError("input_ids: the prompt is empty")
    length = value("input_lengths", int, ids.size)
    if not 0 < length <= ids.size:
        raise InputError(f"input_lengths: expected 1..{ids.size}, got {length}")
    sampling = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        stop_token_ids=tuple(stop_ids),
        ignore_eos=end_id == -1,
        logprobs=logprobs,
    )
    mode = array("mode")
    assert mode is not None
    try:
        mode_name = mode.reshape(-1)[0].decode()
    except (UnicodeDecodeError, AttributeError):  # bytes that are no text; not a STRING tensor
        raise InputError("mode: expected ar, diffusion or self-spec") from None
    decoding = DecodeConfig(
        mode=mode_name,
        block_length=value("block_length", int),
        threshold=threshold,
    )
    return Request(
        [int(t) for t in ids.reshape(-1)[:length]],
        sampling,
        decoding,
        is_stream,
        prepend_prompt=not is_stream and not value("exclude_input_in_output", bool, True),
        batch_index=row,
    )
