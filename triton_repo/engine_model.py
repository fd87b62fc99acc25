"""The engine model (python backend, decoupled): loads the engine dir once and serves every mode.

execute() parses each request (request.py) and hands it to the EngineLoop (loop.py), which
batches requests of all modes in flight and answers through each request's response sender.
Bad input and "overloaded" are answered at once with an error response; nothing else blocks.

Cancellation. A client that cancels (gRPC: it closes its stream) must free its slot at once. A
request sent to this model directly reports it through its response sender. Through an ensemble
it does not: Triton 2.51 marks the ensemble's request cancelled and checks it only between steps,
so the engine step already running never hears of it (measured: `is_cancelled()` stays false and
`send` keeps succeeding until max_tokens; the python backend of 2.51 has no BLS cancel either).
The requests Triton makes for the later steps do carry the flag, so postprocessing, which runs on
every streamed response, sees it and sends this model a control request holding only
`cancel_sequence_id`; the loop aborts that sequence at the next step boundary. A non-streamed
request has no later step before its end, so a client that leaves it runs it to the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from trimode.errors import EngineError, TrimodeError
from trimode.triton_repo.loop import EngineLoop, Job, Overloaded
from trimode.triton_repo.metrics import TritonMetrics
from trimode.triton_repo.request import parse_request
from trimode.triton_repo.tensors import ENGINE_INPUTS


class TritonSink:
    def __init__(self, request):
        self._sender = request.get_response_sender()

    def send(self, outputs, final: bool) -> None:
        response = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])
        self._sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)

    def fail(self, message: str) -> None:
        self._sender.send(
            pb_utils.InferenceResponse(error=pb_utils.TritonError(message)),
            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
        )

    def close(self) -> None:
        try:
            self._sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception:  # noqa: BLE001 (a cancelled request may refuse even the final flag; nothing is owed)
            pass

    def is_cancelled(self) -> bool:
        return self._sender.is_cancelled()


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        from trimode.builder.engine_dir import load_engine

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        engine_dir = Path(params["engine_dir"])
        self.built = load_engine(engine_dir)  # checks the files and re-runs the self-test
        if self.built.manifest["digest_sha256"] != params.get("engine_digest", self.built.manifest["digest_sha256"]):
            raise EngineError(f"{engine_dir} was rebuilt after this repository was written; rerun `trimode repo`")
        self.vocab_size = self.built.checkpoint.spec.vocab_size
        self.default_block_length = self.built.default_block_length
        self.metrics = TritonMetrics(config["name"])
        self.loop = EngineLoop(self.built.new_engine(), int(params["max_queued_requests"]), self.metrics)

    def execute(self, requests):
        for request in requests:
            sink = TritonSink(request)
            cancel = pb_utils.get_input_tensor_by_name(request, "cancel_sequence_id")
            if cancel is not None:  # a control request (module doc): nothing to generate
                self.loop.cancel(int(cancel.as_numpy().reshape(-1)[0]))
                sink.close()
                continue
            arrays = {t.name: pb_utils.get_input_tensor_by_name(request, t.name) for t in ENGINE_INPUTS}
            try:
                parsed = parse_request(
                    lambda name: None if arrays[name] is None else arrays[name].as_numpy(),
                    self.vocab_size,
                    self.default_block_length,
                )
                self.loop.submit(Job(parsed, sink))
            except Overloaded as e:
                self.metrics.rejected("overloaded")
                sink.fail(str(e))
            except TrimodeError as e:
                self.metrics.rejected("invalid")
                sink.fail(str(e))
        return None  # decoupled: the responses go through each request's sender

    def finalize(self) -> None:
        self.loop.stop()
