"""postprocessing: the engine's packed response (response.py) -> text_output (text.py) and the
ensemble's other tensors.

It is also how a client's cancel reaches the engine through an ensemble (engine_model.py): a step
request of a cancelled ensemble request reports is_cancelled(), and this model then asks the
engine model to abort that sequence (once per sequence). It still answers as usual: an error
answer there left the ensemble request in flight for ever (tritonserver then waited its full exit
timeout on SIGTERM), while a normal one lets Triton finish and drop it.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import triton_python_backend_utils as pb_utils

from trimode.triton_repo.preprocessing_model import load_tokenizer
from trimode.triton_repo.response import unpack
from trimode.triton_repo.tensors import PASSED_ON
from trimode.triton_repo.text import new_text

_REMEMBERED = 1024  # sequence ids already cancelled: the engine may send a step or two more for them


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.tokenizer = load_tokenizer(params)
        self.engine_model = params["engine_model"]
        self.is_engine_decoupled = params.get("engine_decoupled", "true") == "true"
        self.cancelled: OrderedDict[int, None] = OrderedDict()

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _one(self, request):
        out = unpack(lambda name: pb_utils.get_input_tensor_by_name(request, name).as_numpy())
        if request.is_cancelled():
            self._cancel(int(out["sequence_id"][0, 0]))  # and answer as usual: Triton drops it
        ids = out["output_ids"].reshape(-1).tolist()
        text = new_text(self.tokenizer.decode, ids, int(out["prefix_length"][0, 0]), bool(out["is_final"][0, 0]))
        # [1], not [1, 1]: TensorRT-LLM's clients read output[0].decode()
        tensors = [pb_utils.Tensor("out_text_output", np.array([text.encode()], dtype=np.object_))]
        tensors += [pb_utils.Tensor(f"out_{t.name}", out[t.name]) for t in PASSED_ON]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def _cancel(self, seq_id: int) -> None:
        if seq_id in self.cancelled:
            return
        self.cancelled[seq_id] = None
        if len(self.cancelled) > _REMEMBERED:
            self.cancelled.popitem(last=False)
        control = pb_utils.InferenceRequest(
            model_name=self.engine_model,
            requested_output_names=[],
            inputs=[pb_utils.Tensor("cancel_sequence_id", np.array([[seq_id]], dtype=np.uint64))],
        )
        answers = control.exec(decoupled=True) if self.is_engine_decoupled else [control.exec()]
        for response in answers:  # the engine answers with the final flag alone, or one empty response
            if response.has_error():
                pb_utils.Logger.log_warn(f"cancel of sequence {seq_id}: {response.error().message()}")
