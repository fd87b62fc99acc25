"""postprocessing: the engine's token ids -> text_output (text.py), statistics passed on."""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from trimode.triton_repo.preprocessing_model import load_tokenizer
from trimode.triton_repo.tensors import STATISTICS
from trimode.triton_repo.text import new_text


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.tokenizer = load_tokenizer({k: v["string_value"] for k, v in config.get("parameters", {}).items()})

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _one(self, request):
        get = lambda name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()  # noqa: E731
        ids = [int(t) for t in get("output_ids").reshape(-1)]
        text = new_text(self.tokenizer.decode, ids, int(get("prefix_length").reshape(-1)[0]),
                        bool(get("is_final").reshape(-1)[0]))
        tensors = [pb_utils.Tensor("out_text_output", np.array([[text.encode()]], dtype=np.object_))]
        tensors += [pb_utils.Tensor(f"out_{t.name}", get(t.name)) for t in STATISTICS]
        return pb_utils.InferenceResponse(output_tensors=tensors)
