"""One engine model response, packed for its hop to postprocessing and unpacked there into the
tensors the ensemble returns (tensors.py).

Each tensor of a response costs the engine's thread a pb_utils.Tensor and a shared-memory copy, and
Triton a routing. Sent as the 17 tensors the ensemble returns, responses took 30% of the engine
thread at concurrency 8 (py-spy, docs/performance.md), so the engine sends four (ENGINE_OUTPUTS):

- output_ids INT32 [1, n]: the tokens, the first prefix_length of them already rendered (text.py);
- response INT64 [1, len(RESPONSE_FIELDS)]: the scalars, finish_reason as its index in FINISH_REASONS
  and mean_accepted_length as accepted tokens over drafting cycles;
- log_probs FP32 [1, m]: empty unless asked (num_top_log_probs >= 0), else cum_log_probs, the log
  probs of the response's t new tokens, then their top k (t x k);
- log_prob_ids INT32 [1, m']: empty unless asked, else the t new tokens, then the ids of their top k.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from trimode.decoding.sequence import Sequence
from trimode.triton_repo.tensors import RESPONSE_FIELDS

FINISH_REASONS = ("", "eos", "length", "abort", "error")  # "": not finished


def pack(seq: Sequence, ids: list[int], prefix_length: int, final: bool, handle: int, batch_index: int, new: slice):
    """The engine model's output arrays for one response; new: the tokens whose log probs it carries."""
    stats, k = seq.stats, seq.params.logprobs
    fields = {
        "prefix_length": prefix_length,
        "is_final": final,
        "sequence_id": handle,  # what postprocessing names to cancel it (63 bits)
        "batch_index": batch_index,
        "sequence_index": 0,
        "num_input_tokens": len(seq.prompt),
        "num_output_tokens": len(seq.tokens),
        "num_forward_passes": stats.num_passes,
        "num_accepted_tokens": sum(stats.accepted_lengths),  # self-spec; no cycles in ar and diffusion
        "num_drafting_cycles": len(stats.accepted_lengths),
        "finish_reason": FINISH_REASONS.index(seq.finish_reason or ""),
        "num_top_log_probs": -1 if k is None else k,
    }
    values, value_ids = [], []
    if k is not None:
        tops = seq.top_logprobs[new] if k else [[] for _ in seq.logprobs[new]]
        values = [sum(seq.logprobs[: new.stop]), *seq.logprobs[new], *(v for top in tops for _, v in top)]
        value_ids = [*seq.tokens[new], *(t for top in tops for t, _ in top)]
    return {
        "output_ids": np.array(ids, dtype=np.int32).reshape(1, -1),
        "response": np.array([[fields[name] for name in RESPONSE_FIELDS]], dtype=np.int64),
        "log_probs": np.array(values, dtype=np.float32).reshape(1, -1),
        "log_prob_ids": np.array(value_ids, dtype=np.int32).reshape(1, -1),
    }


def read_fields(get: Callable[[str], np.ndarray]) -> dict[str, int]:
    """get(name) -> one of pack's arrays; -> the response's scalars by name (RESPONSE_FIELDS)."""
    return dict(zip(RESPONSE_FIELDS, (int(v) for v in get("response").reshape(-1))))


def mean_accepted_length(fields: dict[str, int]) -> float:
    """Accepted tokens per drafting cycle; 0 where the mode accepts no drafts (ar, diffusion)."""
    cycles = fields["num_drafting_cycles"]
    return fields["num_accepted_tokens"] / cycles if cycles else 0.0


def unpack(get: Callable[[str], np.ndarray]) -> dict[str, np.ndarray]:
    """get(name) -> one of pack's arrays; -> output_ids, prefix_length, is_final, sequence_id and the
    tensors postprocessing passes on (tensors.py PASSED_ON), in the ensemble's dtypes and shapes."""
    fields = read_fields(get)
    scalar = lambda name, dtype: np.array([[fields[name]]], dtype=dtype)  # noqa: E731
    return {
        "output_ids": get("output_ids").reshape(1, -1),
        "prefix_length": scalar("prefix_length", np.int32),
        "is_final": scalar("is_final", bool),
        "sequence_id": scalar("sequence_id", np.uint64),
        **_log_probs(get, fields["num_top_log_probs"]),
        "batch_index": scalar("batch_index", np.int32),
        "sequence_index": scalar("sequence_index", np.int32),
        "num_input_tokens": scalar("num_input_tokens", np.int32),
        "num_output_tokens": scalar("num_output_tokens", np.int32),
        "num_forward_passes": scalar("num_forward_passes", np.int32),
        "mean_accepted_length": np.array([[mean_accepted_length(fields)]], np.float32),
        "finish_reason": np.array([[FINISH_REASONS[fields["finish_reason"]].encode()]], dtype=np.object_),
    }


def _log_probs(get: Callable[[str], np.ndarray], k: int) -> dict[str, np.ndarray]:
    """cum_log_probs [1, 1] (over every token so far), output_log_probs [1, 1, t], the top-k [1, t, k]
    and the ids [1, t] of the response's t new tokens; empty when the request asked for none."""
    if k < 0:
        return {
            "cum_log_probs": np.zeros((1, 0), np.float32),
            "output_log_probs": np.zeros((1, 1, 0), np.float32),
            "top_log_probs": np.zeros((1, 0, 0), np.float32),
            "top_log_prob_ids": np.zeros((1, 0, 0), np.int32),
            "output_token_ids": np.zeros((1, 0), np.int32),
        }
    values, ids = get("log_probs").reshape(-1), get("log_prob_ids").reshape(-1)
    t = len(ids) // (1 + k)
    return {
        "cum_log_probs": values[:1].reshape(1, 1),
        "output_log_probs": values[1 : 1 + t].reshape(1, 1, t),
        "top_log_probs": values[1 + t :].reshape(1, t, k),
        "top_log_prob_ids": ids[t:].reshape(1, t, k),
        "output_token_ids": ids[:t].reshape(1, t),
    }
