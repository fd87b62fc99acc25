"""One engine-model request's tensors -> what the Engine needs, or an InputError naming the input.

Every TensorRT-LLM input the ensembles accept is either honoured or refused here: beam search,
top-k/top-p filtering, penalties, log probs and min_length are not in our decoders, so a value
that would need them is an error; values that ask for nothing (beam_width 1, top_p 1, ...) pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from trimode.decoding.settings import DecodeConfig, SamplingParams
from trimode.errors import InputError


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    sampling: SamplingParams
    decoding: DecodeConfig
    is_stream: bool
    prepend_prompt: bool  # exclude_input_in_output = false: the final output_ids start with the prompt's


# input -> (the value that asks for nothing, what to say when another value is given)
_NEUTRAL = {
    "beam_width": (1, "beam search is not supported (beam_width must be 1)"),
    "num_return_sequences": (1, "one sequence per request (num_return_sequences must be 1); send several requests"),
    "repetition_penalty": (1.0, "repetition_penalty is not supported (must be 1)"),
    "presence_penalty": (0.0, "presence_penalty is not supported (must be 0)"),
    "frequency_penalty": (0.0, "frequency_penalty is not supported (must be 0)"),
    "return_log_probs": (False, "log probabilities are not returned (return_log_probs must be false)"),
    "return_context_logits": (False, "logits are not returned (return_context_logits must be false)"),
    "return_generation_logits": (False, "logits are not returned (return_generation_logits must be false)"),
}


def parse_request(
    get: Callable[[str], np.ndarray | None], vocab_size: int, default_block_length: int | None = None
) -> Request:
    """get(name) -> the input's array ([1, ...]: batch first) or None when the client left it out.
    default_block_length: when block_length is left out (None: the checkpoint's block_size)."""
    arrays = {}

    def value(name: str, kind: type, default=None):
        a = get(name)
        if a is None:
            return default
        arrays[name] = a
        if a.ndim == 0 or a.shape[0] != 1:
            raise InputError(
                f"{name}: one request holds one prompt (batch size 1), got shape {list(a.shape)}; "
                f"send several requests, the engine batches them in flight"
            )
        if a.size != 1:
            raise InputError(f"{name}: expected one value, got {a.size}")
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
    top_k, top_p = value("top_k", int, 0), value("top_p", float, 1.0)
    if top_k not in (0, 1):
        raise InputError(f"top_k={top_k}: top-k filtering is not supported (0: off, 1: greedy)")
    if not (top_p == 1.0 or top_p == 0.0):  # TensorRT-LLM reads 0 as off too
        raise InputError(f"top_p={top_p}: nucleus sampling is not supported (top_p must be 1)")
    min_length = value("min_length", int, 1)
    if min_length > 1:
        raise InputError(f"min_length={min_length}: not supported (every request may end at its first token)")
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
    seed = value("random_seed", int, 0)
    end_id = value("end_id", int)
    stops = get("stop_ids")
    stop_ids = [int(t) for t in stops.reshape(-1)] if stops is not None else []
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
    mode = get("mode")
    prompt = get("input_ids")
    if prompt is None or mode is None:
        raise InputError("input_ids and mode: required (the preprocessing step writes them)")
    is_stream = value("stream", bool, False)
    sampling = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        stop_token_ids=tuple(stop_ids),
        ignore_eos=end_id == -1,
    )
    decoding = DecodeConfig(
        mode=mode.reshape(-1)[0].decode(),
        block_length=value("block_length", int, default_block_length),
        threshold=threshold,
    )
    return Request(
        [int(t) for t in prompt.reshape(-1)],
        sampling,
        decoding,
        is_stream,
        prepend_prompt=not is_stream and not value("exclude_input_in_output", bool, True),
    )
