"""trimode: compile and deploy tri-mode diffusion language models.

The Python API (trimode/llm.py, docs/python-api.md) is imported on first use, so that
`import trimode` (and the CLI) does not import torch:

    from trimode import LLM, SamplingParams
"""

from pathlib import Path

__version__ = "0.1.0"
EMBEDDED_CHECKPOINT = Path(__file__).parent / "assets" / "default"  # the default model of every command

__all__ = ["LLM", "RequestOutput", "SamplingParams", "__version__"]

_LAZY = ("LLM", "RequestOutput", "SamplingParams")  # defined in trimode.llm


def __getattr__(name: str):
    if name in _LAZY:
        from trimode import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'trimode' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
