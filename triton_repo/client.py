"""Generate through a running server with tritonclient: one ensemble per mode, gRPC or HTTP,
whole text or streamed. What `trimode generate --url` and the serving tests call."""

from __future__ import annotations

import http.client
import json
import queue
import urllib.error
import urllib.request
from collections.abc import Callable, Generator, Iterator

import numpy as np

from trimode.errors import MissingDependencyError, TrimodeError
from trimode.passes import Mode
from trimode.triton_repo.tensors import ENSEMBLE_INPUTS

# Triton type -> numpy dtype, for every ensemble input (tensors.py)
_NUMPY = {"STRING": np.object_, "INT32": np.int32, "UINT64": np.uint64, "FP32": np.float32, "BOOL": bool}
_TYPES = {t.name: t.dtype for t in ENSEMBLE_INPUTS}
_STATS = ("num_input_tokens", "num_output_tokens", "num_forward_passes", "mean_accepted_length", "finish_reason")


class RemoteError(TrimodeError):
    """The server answered with an error (its message is the server's)."""


class NoAnswer(RemoteError):
    """No server of the protocol asked for answered at the address: nothing listens there, or a server
    of the other protocol does (Triton's HTTP and gRPC ports are easy to swap)."""


def no_answer(url: str, protocol: str, error: Exception) -> NoAnswer | None:
    """NoAnswer if error (raised by a call to url over protocol) means that no server of that protocol
    answered there; None if one did (error is its answer)."""
    if protocol == "grpc":
        reason = error.message() if hasattr(error, "message") else str(error)
        if "failed to connect to all addresses" not in reason:  # gRPC's words when no connection worked
            return None
        is_refused = "Connection refused" in reason
        # Triton's HTTP port closes on gRPC's HTTP/2 preface; other HTTP/1 servers refuse it
        is_other = "Socket closed" in reason or "Failed parsing HTTP/2" in reason
    else:
        if isinstance(error, urllib.error.HTTPError) or not isinstance(error, (OSError, http.client.HTTPException)):
            return None
        cause = getattr(error, "reason", error)  # URLError wraps the socket's error
        is_refused = isinstance(cause, ConnectionRefusedError)
        # HTTP/2 frames where a status line should be (Triton's gRPC port), or a hang-up
        is_other = isinstance(cause, (http.client.HTTPException, ConnectionResetError))
        is_garbled = isinstance(cause, http.client.HTTPException) and not isinstance(cause, OSError)
        reason = "its answer is not HTTP/1.1" if is_garbled else getattr(cause, "strerror", None) or str(cause)
    if is_refused:
        hint = "nothing listens there; start a server with `trimode serve REPO`"
    elif is_other:
        hint = (
            "is that the HTTP port? pass --protocol http"
            if protocol == "grpc"
            else "is that the gRPC port? pass --protocol grpc"
        )
    else:
        hint = "check the host and the port"
    return NoAnswer(f"{url}: no Triton server answers there over {protocol} ({reason}): {hint}")


def model_name(mode: Mode | str, prefix: str = "") -> str:
    return prefix + Mode(mode).value.replace("-", "_")


def _inputs(module, inputs: dict) -> list:
    out = []
    for name, value in inputs.items():
        values = value if isinstance(value, (list, tuple)) else [value]  # stop_words: several
        array = np.array([[v.encode() if isinstance(v, str) else v for v in values]], dtype=_NUMPY[_TYPES[name]])
        tensor = module.InferInput(name, list(array.shape), "BYTES" if _TYPES[name] == "STRING" else _TYPES[name])
        tensor.set_data_from_numpy(array)
        out.append(tensor)
    return out


def _result(get: Callable[[str], object], is_log_probs: bool = False) -> dict:
    """One response's text and statistics (plain Python values); with is_log_probs also those of its
    tokens: log_probs, token_ids (None from ensembles without output_token_ids) and top_log_probs,
    per token [(id, log prob)] most likely first."""
    out = {"text": _scalar(get("text_output"))}
    for name in _STATS:
        out[name] = _scalar(get(name))
    if is_log_probs:
        out["log_probs"] = _array(get, "output_log_probs").tolist()
        n, ids = len(out["log_probs"]), get("output_token_ids")
        out["token_ids"] = None if ids is None else _array(get, "output_token_ids").tolist()
        values, top_ids = _array(get, "top_log_probs"), _array(get, "top_log_prob_ids")
        if values.size:  # [1, n, k] (or flat, from HTTP's JSON)
            pairs = zip(top_ids.reshape(n, -1).tolist(), values.reshape(n, -1).tolist())
            out["top_log_probs"] = [list(zip(i, v)) for i, v in pairs]
        else:
            out["top_log_probs"] = [[] for _ in range(n)]
    return out


def _array(get: Callable[[str], object], name: str) -> np.ndarray:
    """A tensor of a response as a flat array (absent: empty)."""
    value = get(name)
    return np.zeros(0) if value is None else np.asarray(value).reshape(-1)


def _asks_log_probs(inputs: dict) -> bool:
    return bool(inputs.get("return_log_probs") or inputs.get("num_top_log_probs"))


def _scalar(array):
    v = np.asarray(array).reshape(-1)[0]
    return v.decode() if isinstance(v, bytes) else v.item()


def stream_grpc(url: str, model: str, inputs: dict, timeout_s: float = 300.0) -> Generator[dict, None, None]:
    """Responses of one request over gRPC's streaming RPC, as they arrive; the last has a
    finish_reason. inputs["stream"] false: one response. inputs: ensemble inputs by name; with
    return_log_probs or num_top_log_probs each result has its tokens' log probs (_result). (An
    ensemble over a decoupled model answers only the streaming RPC: Triton refuses plain ModelInfer
    for it.)"""
    try:
        import tritonclient.grpc as grpcclient
    except ImportError:
        raise MissingDependencyError("tritonclient", "serve") from None
    responses: queue.Queue = queue.Queue()
    is_log_probs = _asks_log_probs(inputs)
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    is_finished = False
    try:
        try:
            client.async_stream_infer(model, _inputs(grpcclient, {"stream": True, **inputs}))
        except grpcclient.InferenceServerException as e:  # the stream broke first (no server): why is queued
            try:
                queued = responses.get(timeout=5)[1]
            except queue.Empty:
                queued = None
            queued = queued or e
            raise no_answer(url, "grpc", queued) or RemoteError(f"{model}: {queued.message()}") from None
        while True:
            result, error = responses.get(timeout=timeout_s)
            if error is not None:
                is_finished = True  # an error response ends the request, or the stream broke
                raise no_answer(url, "grpc", error) or RemoteError(f"{model}: {error.message()}")
            out = _result(result.as_numpy, is_log_probs)
            yield out
            if out["finish_reason"]:
                is_finished = True
                return
    finally:
        # A finished request closes its stream the way gRPC expects: we half-close, the server
        # completes it. Only a consumer that stops early (or a timeout) cancels. Cancelling finished
        # requests too raced Triton 2.51's release of the ensemble request: in 3 of 10 runs of two
        # requests the ensemble stayed loaded and tritonserver's shutdown waited out its 30 s exit
        # timeout (0 of 10 since).
        client.stop_stream(cancel_requests=not is_finished)
        client.close()


def infer(url: str, model: str, inputs: dict, protocol: str = "grpc") -> dict:
    """One whole response: gRPC's streaming RPC with stream false, or Triton's HTTP generate endpoint."""
    if protocol == "grpc":
        return list(stream_grpc(url, model, {**inputs, "stream": False}))[-1]
    with _post(url, model, "generate", inputs, timeout_s=None) as response:
        event = json.loads(response.read())
    return _result(event.get, _asks_log_probs(inputs))


def _post(url: str, model: str, endpoint: str, inputs: dict, timeout_s: float | None):
    """The model's HTTP endpoint (generate, generate_stream), answered: its status line read."""
    request = urllib.request.Request(
        f"http://{url}/v2/models/{model}/{endpoint}",
        data=json.dumps(inputs).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        return urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as e:
        raise RemoteError(f"{model}: {_error_of(e)}") from None
    except (OSError, http.client.HTTPException) as e:  # no HTTP server answered (urlopen leaves some unwrapped)
        raise no_answer(url, "http", e) or RemoteError(f"{model}: {e}") from None


def _error_of(e: urllib.error.HTTPError) -> str:
    try:
        return json.loads(e.read()).get("error", e.reason)
    except ValueError:
        return str(e.reason)


def stream_http(url: str, model: str, inputs: dict, timeout_s: float = 300.0) -> Iterator[dict]:
    """Triton's HTTP generate_stream endpoint (server-sent events), one dict per event."""
    is_log_probs = _asks_log_probs(inputs)
    with _post(url, model, "generate_stream", {**inputs, "stream": True}, timeout_s) as response:
        for line in response:
            if line.startswith(b"data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    raise RemoteError(f"{model}: {event['error']}")
                yield _result(event.get, is_log_probs)
