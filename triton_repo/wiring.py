"""Our own check of the ensembles' wiring, run before anything is written.

Triton checks an ensemble only when it loads it, one error at a time, on the serving machine. This
finds every problem at `trimode repo` time: a step calling a model the repository lacks, a map
naming a tensor its model does not have, a model input nobody feeds (or an optional ensemble input
feeding a required one), a tensor used before it is produced or produced twice, a step output
nobody consumes, an ensemble output nobody produces, types or shapes that disagree, and a step
whose inputs come from different decoupled models (or from one and from elsewhere), which Triton refuses.
"""

from __future__ import annotations

from trimode.errors import TrimodeError
from trimode.triton_repo.configs import ModelConfig


class WiringError(TrimodeError):
    """An ensemble's steps do not connect (a bug in the repository writer, never the user's input)."""


def _dims_agree(a, b) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b))


def check_wiring(configs: dict[str, ModelConfig]) -> None:
    """configs: model name -> ModelConfig, every model of the repository; raises WiringError listing all."""
    problems: list[str] = []
    for config in configs.values():
        if config.platform == "ensemble":
            problems += _check_ensemble(config, configs)
    if problems:
        raise WiringError("ensemble wiring: " + "; ".join(problems))


def _check_ensemble(ens, configs: dict[str, ModelConfig]) -> list[str]:
    problems = []
    # tensor name -> (data_type, dims, optional): what is available so far
    available = {t.name: (t.data_type, tuple(t.dims), t.optional) for t in ens.input}
    consumed: set[str] = set()
    produced_by: dict[str, str] = {}
    origin: dict[str, str | None] = {name: None for name in available}  # the decoupled model a tensor comes from
    for step in ens.ensemble_scheduling.step:
        where = f"{ens.name} -> {step.model_name}"
        model = configs.get(step.model_name)
        if model is None:
            problems.append(f"{where}: no such model in the repository")
            continue
        if model.max_batch_size != ens.max_batch_size:
            problems.append(f"{where}: max_batch_size {model.max_batch_size} != the ensemble's {ens.max_batch_size}")
        inputs = {t.name: t for t in model.input}
        for key, value in step.input_map.items():
            if key not in inputs:
                problems.append(f"{where}: the model has no input {key!r}")
            elif value not in available:
                problems.append(f"{where}: input {key!r} reads {value!r}, which nothing produced before")
            else:
                dtype, dims, optional = available[value]
                t = inputs[key]
                if dtype != t.data_type or not _dims_agree(dims, tuple(t.dims)):
                    problems.append(
                        f"{where}: input {key!r} is {t.data_type}{list(t.dims)}, {value!r} is {dtype}{list(dims)}"
                    )
                if optional and not t.optional:
                    problems.append(f"{where}: required input {key!r} is fed by the optional {value!r}")
            consumed.add(value)
        origins = {origin.get(value) for value in step.input_map.values()}
        if len(origins) > 1:
            problems.append(
                f"{where}: its inputs come from different decoupled models "
                f"({', '.join(sorted(o or 'the ensemble' for o in origins))})"
            )
        decoupled = model.model_transaction_policy.decoupled
        step_origin = step.model_name if decoupled else next(iter(origins), None)
        for name, t in inputs.items():
            if not t.optional and name not in step.input_map:
                problems.append(f"{where}: required input {name!r} is not fed")
        outputs = {t.name: t for t in model.output}
        for key, value in step.output_map.items():
            if key not in outputs:
                problems.append(f"{where}: the model has no output {key!r}")
                continue
            if value in available:
                problems.append(f"{where}: {value!r} is produced twice")
            available[value] = (outputs[key].data_type, tuple(outputs[key].dims), False)
            origin[value] = step_origin
            produced_by[value] = where
    for t in ens.output:
        if t.name not in produced_by:
            problems.append(f"{ens.name}: output {t.name!r} is produced by no step")
            continue
        dtype, dims, _ = available[t.name]
        if dtype != t.data_type or not _dims_agree(dims, tuple(t.dims)):
            problems.append(
                f"{ens.name}: output {t.name!r} is {t.data_type}{list(t.dims)}, its step gives {dtype}{list(dims)}"
            )
        consumed.add(t.name)
    for value, where in produced_by.items():
        if value not in consumed:
            problems.append(f"{where}: output {value!r} is consumed by nothing")
    return problems
