"""preprocessing_<mode>: text_input -> input_ids, stop_words -> stop_ids, and the mode for the engine.

A request may hold several prompts (rows); input_ids and stop_ids are then padded with -1 and
input_lengths says each prompt's length. A stop word must be one token (the engine stops on token
ids); bad_words are not supported. Both are refused with an error rather than ignored, and so is
an input this ensemble does not have (unknown_inputs).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from trimode.config import ModelSpec
from trimode.errors import InputError
from trimode.tokenizer import Tokenizer


def load_tokenizer(params: dict) -> Tokenizer:
    checkpoint_dir = Path(params["engine_dir"]) / "checkpoint"
    return Tokenizer(checkpoint_dir, ModelSpec.from_file(checkpoint_dir / "config.json"))


def strings(tensor, name: str) -> list[list[str]]:
    """A STRING input's values as text, a list per row ([B, n]: B prompts)."""
    a = tensor.as_numpy()
    if a.ndim < 1:
        raise InputError(f"{name}: expected [batch, values], got shape {list(a.shape)}")
    try:
        return [[v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in row.reshape(-1)] for row in a]
    except UnicodeDecodeError:
        raise InputError(f"{name}: not valid UTF-8 text") from None


def padded(rows: list[list[int]]) -> np.ndarray:
    """[B, longest] int32, rows padded with -1 (no token id)."""
    width = max((len(r) for r in rows), default=0)
    return np.array([r + [-1] * (width - len(r)) for r in rows], dtype=np.int32).reshape(len(rows), width)


def unknown_inputs(request) -> list[str]:
    """Request parameters: over HTTP, every JSON field that is no input of the ensemble becomes one
    (Triton's generate endpoint), where gRPC refuses an unknown input name."""
    try:
        return sorted(json.loads(request.parameters() or "{}"))
    except ValueError:
        return []


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.tokenizer = load_tokenizer(params)
        self.mode = params["mode"]
        # the family must outlive its metric (Triton refuses a metric whose family was collected)
        self._family = family = pb_utils.MetricFamily(
            name="trimode_preprocessing_rejected_total",
            description="Requests refused before the engine: bad text, stop or bad words, unknown inputs",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.rejected = family.Metric(labels={"model": config["name"]})

    def finalize(self) -> None:
        del self.rejected, self._family  # while the stub can still release them (metrics.py close)

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _one(self, request):
        try:
            unknown = unknown_inputs(request)
            if unknown:
                raise InputError(
                    f"{', '.join(unknown)}: not an input of this model (TensorRT-LLM's ensemble inputs are "
                    f"text_input, max_tokens, seed, temperature, end_id, stream, return_log_probs, ...)"
                )
            texts = strings(pb_utils.get_input_tensor_by_name(request, "text_input"), "text_input")
            num_rows = len(texts)
            ids = []
            for row in texts:
                if len(row) != 1:
                    raise InputError(f"text_input: expected one prompt per row, got {len(row)}")
                if not row[0]:
                    raise InputError("text_input: the prompt is empty")
                ids.append(self.tokenizer.encode(row[0]))
            bad = pb_utils.get_input_tensor_by_name(request, "bad_words")
            if bad is not None and any(w for row in strings(bad, "bad_words") for w in row):
                raise InputError("bad_words: not supported (leave it out or send an empty string)")
            stop = pb_utils.get_input_tensor_by_name(request, "stop_words")
            stop_rows = strings(stop, "stop_words") if stop is not None else [[]]
            if len(stop_rows) not in (1, num_rows):
                raise InputError(f"stop_words: {len(stop_rows)} rows for a request of {num_rows} prompts")
            stop_ids = [self._stop_ids(row) for row in stop_rows] * (num_rows // len(stop_rows))
        except InputError as e:
            self.rejected.increment(1)
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("input_ids", padded(ids)),
                pb_utils.Tensor("input_lengths", np.array([[len(r)] for r in ids], dtype=np.int32)),
                pb_utils.Tensor("stop_ids", padded(stop_ids)),
                pb_utils.Tensor("mode", np.array([[self.mode.encode()]] * num_rows, dtype=np.object_)),
            ]
        )

    def _stop_ids(self, words: list[str]) -> list[int]:
        ids = []
        for word in (w for w in words if w):
            tokens = self.tokenizer.encode_plain(word)
            if len(tokens) != 1:
                raise InputError(
                    f"stop_words: {word!r} is {len(tokens)} tokens; only single-token stop words are supported"
                )
            ids += tokens
        return ids
