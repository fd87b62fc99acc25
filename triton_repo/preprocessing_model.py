"""preprocessing_<mode>: text_input -> input_ids, stop_words -> stop_ids, and the mode for the engine.

A stop word must be one token (the engine stops on token ids); bad_words are not supported.
Both are refused with an error rather than ignored.
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


def strings(tensor, name: str) -> list[str]:
    """A STRING input's values as text ([1, n]: one request)."""
    a = tensor.as_numpy()
    if a.ndim < 1 or a.shape[0] != 1:
        raise InputError(
            f"{name}: one request holds one prompt (batch size 1), got shape {list(a.shape)}; "
            f"send several requests, the engine batches them in flight"
        )
    try:
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in a.reshape(-1)]
    except UnicodeDecodeError:
        raise InputError(f"{name}: not valid UTF-8 text") from None


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.tokenizer = load_tokenizer(params)
        self.mode = params["mode"]

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _one(self, request):
        try:
            texts = strings(pb_utils.get_input_tensor_by_name(request, "text_input"), "text_input")
            if len(texts) != 1:
                raise InputError(f"text_input: expected one prompt, got {len(texts)}")
            if not texts[0]:
                raise InputError("text_input: the prompt is empty")
            ids = self.tokenizer.encode(texts[0])
            bad = pb_utils.get_input_tensor_by_name(request, "bad_words")
            if bad is not None and any(strings(bad, "bad_words")):
                raise InputError("bad_words: not supported (leave it out or send an empty string)")
            stop_ids = []
            stop = pb_utils.get_input_tensor_by_name(request, "stop_words")
            for word in [w for w in strings(stop, "stop_words") if w] if stop is not None else []:
                tokens = self.tokenizer.encode_plain(word)
                if len(tokens) != 1:
                    raise InputError(
                        f"stop_words: {word!r} is {len(tokens)} tokens; only single-token stop words are supported"
                    )
                stop_ids += tokens
        except InputError as e:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("input_ids", np.array([ids], dtype=np.int32)),
                pb_utils.Tensor("stop_ids", np.array([stop_ids], dtype=np.int32).reshape(1, -1)),
                pb_utils.Tensor("mode", np.array([[self.mode.encode()]], dtype=np.object_)),
            ]
        )
