"""Every tensor of the repository, named once: the ensembles' external interface and the models' own.

The ensembles take and return TensorRT-LLM's ensemble tensors (same names, dtypes and shapes:
text_output is [1] per response, cum_log_probs [1, 1], output_log_probs [1, 1, tokens], batch_index
[1, 1]), so clients and tools written for a TensorRT-LLM Triton deployment call ours unchanged.
`block_length`, `threshold` and `num_top_log_probs` (with its two outputs) are ours. Inputs of
theirs that we cannot honour (beam_width > 1, top_p < 1, bad_words, ...) are accepted by the schema
and refused by the engine model with an error (request.py), never silently ignored; an input that
is no tensor of the schema is refused too (over HTTP Triton hands it on as a request parameter,
which preprocessing refuses).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # Triton's type without TYPE_: STRING, INT32, UINT64, FP32, BOOL
    dims: tuple[int, ...] = (1,)  # without the batch dimension (every model has max_batch_size > 0)
    optional: bool = False


def _opt(name: str, dtype: str, dims: tuple[int, ...] = (1,)) -> Tensor:
    return Tensor(name, dtype, dims, optional=True)


# Sampling and output inputs the ensemble hands straight to the engine model.
ENGINE_PASS_THROUGH = (
    _opt("end_id", "INT32"),
    _opt("pad_id", "INT32"),
    _opt("top_k", "INT32"),
    _opt("top_p", "FP32"),
    _opt("temperature", "FP32"),
    _opt("length_penalty", "FP32"),
    _opt("repetition_penalty", "FP32"),
    _opt("min_tokens", "INT32"),
    _opt("min_length", "INT32"),  # min_tokens' older name
    _opt("presence_penalty", "FP32"),
    _opt("frequency_penalty", "FP32"),
    _opt("seed", "UINT64"),
    _opt("random_seed", "UINT64"),  # seed's older name
    _opt("return_log_probs", "BOOL"),
    _opt("num_top_log_probs", "INT32"),  # ours: also the k most likely tokens at each position (<= 20)
    _opt("return_context_logits", "BOOL"),
    _opt("return_generation_logits", "BOOL"),
    _opt("return_perf_metrics", "BOOL"),
    _opt("return_num_output_tokens", "BOOL"),
    _opt("beam_width", "INT32"),
    _opt("num_return_sequences", "INT32"),
    _opt("stream", "BOOL"),
    _opt("exclude_input_in_output", "BOOL"),
    _opt("block_length", "INT32"),
    _opt("threshold", "FP32"),  # ours
)

ENSEMBLE_INPUTS = (
    Tensor("text_input", "STRING", (-1,)),
    Tensor("max_tokens", "INT32"),
    _opt("bad_words", "STRING", (-1,)),
    _opt("stop_words", "STRING", (-1,)),
    *ENGINE_PASS_THROUGH,
)

# Per-request statistics, from the engine model's response (response.py), passed on by postprocessing.
STATISTICS = (
    Tensor("num_input_tokens", "INT32"),
    Tensor("num_output_tokens", "INT32"),
    Tensor("num_forward_passes", "INT32"),
    Tensor("mean_accepted_length", "FP32"),
    Tensor("finish_reason", "STRING"),
)

# Per response. Log probs are empty ([1, 0], [1, 1, 0], [1, 0, 0], [1, 0]) unless return_log_probs (or
# num_top_log_probs) asked for them; streamed, a response has those of its new tokens, and
# cum_log_probs the sum over every token so far.
LOG_PROBS = (
    Tensor("cum_log_probs", "FP32", (-1,)),
    Tensor("output_log_probs", "FP32", (-1, -1)),
    Tensor("top_log_probs", "FP32", (-1, -1)),  # ours: [1, tokens, k]
    Tensor("top_log_prob_ids", "INT32", (-1, -1)),  # ours: the token ids of top_log_probs
    Tensor("output_token_ids", "INT32", (-1,)),  # ours: [1, n] the tokens output_log_probs are of
)
# the prompt's row in a request holding several prompts, and the sequence (one per prompt: 0)
INDICES = (Tensor("batch_index", "INT32"), Tensor("sequence_index", "INT32"))

ENSEMBLE_OUTPUTS = (Tensor("text_output", "STRING", (-1,)), *LOG_PROBS, *INDICES, *STATISTICS)

PREPROCESSING_INPUTS = (
    Tensor("text_input", "STRING", (-1,)),
    _opt("bad_words", "STRING", (-1,)),
    _opt("stop_words", "STRING", (-1,)),
)
# a request of B prompts: input_ids [B, longest] and stop_ids [B, most], padded with -1
PREPROCESSING_OUTPUTS = (
    Tensor("input_ids", "INT32", (-1,)),
    Tensor("input_lengths", "INT32"),
    Tensor("stop_ids", "INT32", (-1,)),
    Tensor("mode", "STRING"),
)

# Optional at the engine (every ensemble feeds them; request.py refuses a request without them) so
# that a control request can carry cancel_sequence_id alone: postprocessing sends one when it sees
# that the client cancelled, because Triton 2.51 does not pass an ensemble's cancellation on to the
# step already running in the engine model (engine_model.py).
ENGINE_INPUTS = (
    _opt("input_ids", "INT32", (-1,)),
    _opt("input_lengths", "INT32"),
    _opt("stop_ids", "INT32", (-1,)),
    _opt("mode", "STRING"),
    _opt("max_tokens", "INT32"),
    *ENGINE_PASS_THROUGH,
    _opt("cancel_sequence_id", "UINT64"),
)
# One response, packed (response.py): output_ids are the tokens of this response with up to WINDOW
# earlier ones in front (prefix_length of them), so postprocessing, which keeps no state, can cut
# exactly the new text (text.py). (With exclude_input_in_output = false the final output_ids start
# with the prompt's, as TensorRT-LLM's do: postprocessing may read only the engine's tensors, since
# Triton refuses a step that mixes tensors of a decoupled model with others.)
# the scalars of `response`, in order
RESPONSE_FIELDS = (
    "prefix_length",
    "is_final",
    "sequence_id",
    "batch_index",
    "sequence_index",
    "num_input_tokens",
    "num_output_tokens",
    "num_forward_passes",
    "num_accepted_tokens",
    "num_drafting_cycles",
    "finish_reason",
    "num_top_log_probs",  # -1: no log probs asked
)
ENGINE_OUTPUTS = (
    Tensor("output_ids", "INT32", (-1,)),
    Tensor("response", "INT64", (len(RESPONSE_FIELDS),)),
    Tensor("log_probs", "FP32", (-1,)),
    Tensor("log_prob_ids", "INT32", (-1,)),
)
POSTPROCESSING_INPUTS = ENGINE_OUTPUTS
POSTPROCESSING_OUTPUTS = tuple(Tensor(f"out_{t.name}", t.dtype, t.dims) for t in ENSEMBLE_OUTPUTS)
PASSED_ON = (*LOG_PROBS, *INDICES, *STATISTICS)  # what postprocessing unpacks (response.py) and hands on
# what the engine model reads from an ensemble step (cancel_sequence_id comes only from postprocessing)
ENGINE_STEP_INPUTS = tuple(t for t in ENGINE_INPUTS if t.name != "cancel_sequence_id")
