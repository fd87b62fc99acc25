from __future__ import annotations

import os

import torch

# Triton kernels run on CPU tensors through the interpreter, which must be chosen before any
# kernel is decorated; on a CUDA machine (scripts/gpu_check.sh) they compile for the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from trimode.checkpoint import load_checkpoint  # noqa: E402
from trimode.make_checkpoint import make_random_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A random tiny checkpoint with peaky logits (so diffusion thresholds commit several tokens)."""
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0, init_std=0.15)


@pytest.fixture(scope="session")
def tiny_adapter_dir(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-lora", seed=1, init_std=0.15,
                                  with_draft_adapter=True, num_shards=3)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    return load_checkpoint(tiny_dir)


@pytest.fixture(scope="session")
def tiny_adapter(tiny_adapter_dir):
    return load_checkpoint(tiny_adapter_dir)


@pytest.fixture(scope="session")
def trained():
    """The embedded default checkpoint (trimode/assets/default), trained on the standard library."""
    from trimode.cli import EMBEDDED_CHECKPOINT

    return load_checkpoint(EMBEDDED_CHECKPOINT)


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where kernel tests run: the GPU when there is one, else CPU through TRITON_INTERPRET."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def kernels(monkeypatch):
    """Route the runtime's op calls to the Triton kernels (interpreted on CPU)."""
    monkeypatch.setenv("TRIMODE_KERNELS", "triton")
