from __future__ import annotations

import os
from pathlib import Path

import torch

# Triton kernels run on CPU tensors through the interpreter, which must be chosen before any
# kernel is decorated; on a CUDA machine (scripts/gpu_check.sh) they compile for the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist (make test: -n auto): the workers share the cores, so each takes its part of them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from trimode.checkpoint import load_checkpoint  # noqa: E402
from trimode.make_checkpoint import make_random_checkpoint  # noqa: E402

# The files each worker starts with (make test runs `-n auto --dist loadfile --no-loadscope-reorder`,
# so the files are handed out in this order, then alphabetically). The run's two costly builds start
# at once, one per worker: test_builder.py builds the embedded checkpoint's engine first, and
# test_deploy.py the shared tiny deploy that every server test waits for; then the slowest files that
# need neither.
FIRST_FILES = [
    "test_builder.py",
    "test_deploy.py",
    "test_kernels_decoding.py",
    "test_kernels_sampling.py",
    "test_builder_onnx.py",
    "test_decoding.py",
]


# Cases of costly parametrized tests that `make test` also runs on another CPU kernel path (marker
# `numerics`; cheap files carry the marker themselves): the self-spec == AR invariant on the trained
# checkpoint, batched, at its block size, for linear and quadratic self-spec and auto.
NUMERICS_CASES = {
    "test_decoding.py::test_self_spec_greedy_equals_ar[trained-True-8]",
    "test_quadratic.py::test_quadratic_greedy_equals_ar[trained-True-8]",
    "test_auto.py::test_auto_greedy_equals_ar_whatever_it_runs[True-8-trained]",
}


def pytest_collection_modifyitems(items) -> None:
    rank = {name: i for i, name in enumerate(FIRST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's order is kept
    for item in items:
        if f"{item.path.name}::{item.name}" in NUMERICS_CASES:
            item.add_marker(pytest.mark.numerics)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A random tiny checkpoint with peaky logits (so diffusion thresholds commit several tokens)."""
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0, init_std=0.15)


@pytest.fixture(scope="session")
def tiny_adapter_dir(tmp_path_factory):
    return make_random_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "tiny-lora", seed=1, init_std=0.15, with_draft_adapter=True, num_shards=3
    )


@pytest.fixture(scope="session")
def tiny_wide_adapter_dir(tmp_path_factory):
    """A random tiny checkpoint whose draft adapter adapts every linear of every layer (q/k/v/o,
    gate/up/down), not only NVIDIA's o_proj."""
    from trimode.make_checkpoint import write_draft_adapter
    from trimode.model import DRAFT_LINEARS

    path = make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-wide", seed=2, init_std=0.15)
    model, gen = load_checkpoint(path).model, torch.Generator().manual_seed(2)
    factors = {}
    for i, layer in enumerate(model.encoder.layers):
        for name, owner in DRAFT_LINEARS.items():
            w = getattr(getattr(layer, owner), name).weight
            factors[i, name] = (
                0.05 * torch.randn(4, w.shape[1], generator=gen),
                0.05 * torch.randn(w.shape[0], 4, generator=gen),
            )
    write_draft_adapter(path / "linear_spec_lora", factors, alpha=16.0)
    return path


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    return load_checkpoint(tiny_dir)


@pytest.fixture(scope="session")
def tiny_adapter(tiny_adapter_dir):
    return load_checkpoint(tiny_adapter_dir)


@pytest.fixture(scope="session")
def tiny_wide_adapter(tiny_wide_adapter_dir):
    return load_checkpoint(tiny_wide_adapter_dir)


@pytest.fixture(scope="session")
def trained():
    """The embedded default checkpoint (trimode/assets/default), trained on the standard library."""
    from trimode.cli import EMBEDDED_CHECKPOINT

    return load_checkpoint(EMBEDDED_CHECKPOINT)


@pytest.fixture
def runner():
    return CliRunner()


def file_tree(root) -> dict[str, bytes | None]:
    """Every path under root, hidden ones included: a file's bytes, None for a folder."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


@pytest.fixture
def tree():
    return file_tree


@pytest.fixture
def refused(runner):
    """Run the CLI on bad input and check the README's promise: the exit status, exactly one
    `Error:` line (on stderr) containing `message`, no traceback, nothing on stdout, and every file
    under `watch` (inputs and the output's surroundings) byte-identical, nothing added."""
    from trimode.cli import main

    def check(args, watch, message: str, exit_code: int = 1):
        before = file_tree(watch)
        result = runner.invoke(main, [str(a) for a in args])
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        assert result.exit_code == exit_code, result.output
        assert "Traceback" not in result.output
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, result.output
        assert message in errors[0], result.output
        assert result.stdout == "", result.stdout
        assert file_tree(watch) == before
        result.error = errors[0]
        return result

    return check


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where kernel tests run: the GPU when there is one, else CPU through TRITON_INTERPRET."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def kernels(monkeypatch):
    """Route the runtime's op calls to the Triton kernels (interpreted on CPU)."""
    monkeypatch.setenv("TRIMODE_KERNELS", "triton")


@pytest.fixture(scope="session")
def tiny_engine_dir(tiny_deploy_dir):
    """A torch engine of the tiny checkpoint with its draft adapter, FP8, block length 4: the
    shared deploy's (one build per run serves the engine, repo, serve, bench and deploy tests)."""
    return tiny_deploy_dir / "engine"


def shared_dir(tmp_path_factory, name: str, make) -> Path:
    """A costly directory made once per test run: `make(path)` runs in the first worker that asks
    (pytest-xdist runs test files in several processes), the others wait for it and reuse it."""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's base folder, above every worker's own
    shared = root / "shared"
    shared.mkdir(exist_ok=True)
    with open(shared / f".{name}.shared-lock", "w") as lock:  # not stage_output's .{name}.lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / f".{name}.done").is_file():
            make(shared / name)
            (shared / f".{name}.done").touch()
    return shared / name


# `trimode deploy` options of the shared tiny deploy (small limits: a build's time grows with them)
DEPLOY_ARGS = [
    "--calib-samples",
    "8",
    "--calib-seq-len",
    "48",
    "--max-batch-size",
    "4",
    "--max-seq-len",
    "96",
    "--max-input-len",
    "16",
    "--block-lengths",
    "4",
]


@pytest.fixture(scope="session")
def tiny_deploy_dir(tiny_adapter_dir, tmp_path_factory):
    """`trimode deploy` of the tiny checkpoint with its draft adapter: FP8 checkpoint, engine and
    repository, made once per run; the FP8 engine tests and the deploy tests share it."""
    from trimode.cli import main

    def make(out: Path) -> None:
        result = CliRunner().invoke(main, ["deploy", str(tiny_adapter_dir), "--out", str(out), *DEPLOY_ARGS])
        assert result.exit_code == 0, result.output

    return shared_dir(tmp_path_factory, "tiny-deploy", make)
