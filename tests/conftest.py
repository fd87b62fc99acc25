from __future__ import annotations

import pytest
from click.testing import CliRunner

from trimode.checkpoint import load_checkpoint
from trimode.make_checkpoint import make_random_checkpoint


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
