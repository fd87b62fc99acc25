"""The repository's model configs as Triton's own protobuf messages (never text templates).

    engine                  python backend: one Engine for every mode (engine_model.py); decoupled
                            (streaming, several prompts a request) or not (plain infer), per settings
    preprocessing_<mode>    python: text -> token ids, stop words -> ids, and the mode the engine runs
    postprocessing          python: token ids -> text; passes the statistics on
    <mode>                  ensemble: preprocessing_<mode> -> engine -> postprocessing
    ensemble                optional: one mode again under TensorRT-LLM's ensemble name, which
                            their client scripts call (some accept no other name)

A mode needs its own preprocessing model because an ensemble cannot inject a constant: the mode
reaches the engine as a tensor that preprocessing_<mode> writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trimode.passes import Mode
from trimode.triton_repo import tensors as T
from trimode.triton_repo.settings import DEFAULT_ENGINE_THREADS, RepoSettings, ensemble_name

# tritonclient's model_config_pb2.ModelConfig: a protobuf message, which tritonclient ships no types for
ModelConfig = Any


@dataclass(frozen=True)
class Names:
    prefix: str

    @property
    def engine(self) -> str:
        return f"{self.prefix}engine"

    @property
    def postprocessing(self) -> str:
        return f"{self.prefix}postprocessing"

    def preprocessing(self, mode: Mode) -> str:
        return f"{self.prefix}preprocessing_{mode.value.replace('-', '_')}"

    def ensemble(self, mode: Mode) -> str:
        return ensemble_name(self.prefix, mode)


def _pb():
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


def _io(cls, tensors):
    pb = _pb()
    out = []
    for t in tensors:
        kwargs = {"optional": True} if t.optional else {}
        out.append(cls(name=t.name, data_type=pb.DataType.Value(f"TYPE_{t.dtype}"), dims=list(t.dims), **kwargs))
    return out


def _python_model(name: str, max_batch_size: int, inputs, outputs, instances: int, parameters: dict[str, str]):
    pb = _pb()
    return pb.ModelConfig(
        name=name,
        backend="python",
        max_batch_size=max_batch_size,
        input=_io(pb.ModelInput, inputs),
        output=_io(pb.ModelOutput, outputs),
        # KIND_CPU also on GPU hosts: the engine model places its tensors itself (the engine dir's device)
        instance_group=[pb.ModelInstanceGroup(count=instances, kind=pb.ModelInstanceGroup.KIND_CPU)],
        parameters={k: pb.ModelParameter(string_value=v) for k, v in parameters.items()},
    )


def engine_config(
    names: Names,
    settings: RepoSettings,
    max_batch_size: int,
    engine_dir: str,
    engine_digest: str,
    max_queued_requests: int,
) -> ModelConfig:
    config = _python_model(
        names.engine,
        max_batch_size,
        T.ENGINE_INPUTS,
        T.ENGINE_OUTPUTS,
        1,
        {
            "engine_dir": engine_dir,
            "engine_digest": engine_digest,
            "max_queued_requests": str(max_queued_requests),
            "threads": str(settings.threads or DEFAULT_ENGINE_THREADS),
        },
    )
    # one instance: a second would load a second engine with its own KV pool and split the batch
    config.model_transaction_policy.decoupled = settings.decoupled  # many responses per request
    config.dynamic_batching.max_queue_delay_microseconds = settings.max_queue_delay_us
    return config


def preprocessing_config(
    names: Names, mode: Mode, settings: RepoSettings, max_batch_size: int, engine_dir: str
) -> ModelConfig:
    return _python_model(
        names.preprocessing(mode),
        max_batch_size,
        T.PREPROCESSING_INPUTS,
        T.PREPROCESSING_OUTPUTS,
        settings.instances,
        {"engine_dir": engine_dir, "mode": mode.value},
    )


def postprocessing_config(names: Names, settings: RepoSettings, max_batch_size: int, engine_dir: str) -> ModelConfig:
    return _python_model(
        names.postprocessing,
        max_batch_size,
        T.POSTPROCESSING_INPUTS,
        T.POSTPROCESSING_OUTPUTS,
        settings.instances,
        {"engine_dir": engine_dir, "engine_model": names.engine, "engine_decoupled": str(settings.decoupled).lower()},
    )


def ensemble_config(names: Names, mode: Mode, max_batch_size: int, name: str | None = None) -> ModelConfig:
    """External tensor X <-> internal tensor _X; the steps' maps are {model tensor: ensemble tensor}.
    name: the model's name (default: the mode's)."""
    pb = _pb()
    Step = pb.ModelEnsembling.Step
    internal = lambda name: f"_{name}"  # noqa: E731
    pre = Step(
        model_name=names.preprocessing(mode),
        model_version=-1,
        input_map={t.name: t.name for t in T.PREPROCESSING_INPUTS},
        output_map={t.name: internal(t.name) for t in T.PREPROCESSING_OUTPUTS},
    )
    engine_inputs = {t.name: internal(t.name) for t in T.PREPROCESSING_OUTPUTS}
    engine_inputs |= {t.name: t.name for t in T.ENGINE_STEP_INPUTS if t.name not in engine_inputs}
    engine = Step(
        model_name=names.engine,
        model_version=-1,
        input_map=engine_inputs,
        output_map={t.name: internal(t.name) for t in T.ENGINE_OUTPUTS},
    )
    post = Step(
        model_name=names.postprocessing,
        model_version=-1,
        input_map={t.name: internal(t.name) for t in T.POSTPROCESSING_INPUTS},
        output_map={f"out_{t.name}": t.name for t in T.ENSEMBLE_OUTPUTS},
    )
    return pb.ModelConfig(
        name=name or names.ensemble(mode),
        platform="ensemble",
        max_batch_size=max_batch_size,
        input=_io(pb.ModelInput, T.ENSEMBLE_INPUTS),
        output=_io(pb.ModelOutput, T.ENSEMBLE_OUTPUTS),
        ensemble_scheduling=pb.ModelEnsembling(step=[pre, engine, post]),
    )
