"""AOTInductor packages loaded through a binding of our own, which lets go of the GIL during a pass.

torch's Python binding of the package loader (`torch._C._aoti.AOTIModelPackageLoader`) keeps the
GIL for the whole pass, so no other thread of the process runs Python meanwhile: in the Triton
engine model neither the thread sending the last step's responses nor the stub's own threads
(new requests, cancellations). Measured in docs/performance.md ("Pass efficiency"). This binding
wraps the same C++ loader (`torch::inductor::AOTIModelPackageLoader`) and runs `boxed_run` under
`py::gil_scoped_release`; torch's binding cannot be reused from an extension (pybind refuses the
cast). It is compiled once per machine and torch version on first use (torch.utils.cpp_extension
and ninja, about 30 s, kept in ~/.cache/trimode); where that fails (no compiler, headers or ninja),
the packages load through torch's binding as before, with one warning.
"""

from __future__ import annotations

import functools
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

struct Loader {
  torch::inductor::AOTIModelPackageLoader loader;
  explicit Loader(const std::string& path) : loader(path) {}
  std::vector<std::string> constant_fqns() { return loader.get_constant_fqns(); }
  // user-managed: the loader keeps the tensors' pointers; the caller keeps the tensors alive
  void load_constants(std::unordered_map<std::string, at::Tensor> constants, bool check_full_update) {
    loader.load_constants(constants, false, check_full_update, true);
  }
  std::vector<at::Tensor> boxed_run(std::vector<at::Tensor> inputs) {
    py::gil_scoped_release no_gil;
    return loader.boxed_run(std::move(inputs));
  }
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Loader>(m, "Loader")
      .def(py::init<const std::string&>())
      .def("get_constant_fqns", &Loader::constant_fqns)
      .def("load_constants", &Loader::load_constants)
      .def("boxed_run", &Loader::boxed_run);
}
"""


class Package:
    """A loaded package: AOTICompiledModel's calls the torch backend makes, on our binding."""

    releases_gil = True

    def __init__(self, path: str):
        self.loader = _extension().Loader(path)

    def get_constant_fqns(self) -> list[str]:
        return self.loader.get_constant_fqns()

    def load_constants(self, constants: dict[str, torch.Tensor], *, check_full_update: bool, user_managed: bool):
        assert user_managed, "the binding keeps the tensors' pointers: the caller must keep them alive"
        self.loader.load_constants(constants, check_full_update)


_STALE_LOCK_S = 600  # a build takes ~30 s; a lock this old is a killed build's (SIGKILL skips its cleanup)


@functools.cache
def _extension() -> Any:
    from torch.utils.cpp_extension import load_inline

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = cache / "trimode" / f"aoti_loader-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
    folder.mkdir(parents=True, exist_ok=True)
    clear_stale_lock(folder)
    return load_inline("trimode_aoti_loader", cpp_sources=[_SOURCE], build_directory=str(folder), verbose=False)


def clear_stale_lock(folder: Path) -> None:
    """torch's build lock: while it exists a second process waits for ever, so one left by a killed
    build (SIGKILL skips its cleanup) is removed once older than any build."""
    lock = folder / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
        lock.unlink(missing_ok=True)


@functools.cache
def is_available() -> bool:
    """Whether the binding builds here (once per process; the build itself is cached per machine)."""
    try:
        _extension()
    except Exception as e:  # noqa: BLE001 (a compiler's or linker's failure: fall back, and say so)
        warnings.warn(
            f"the GIL-free AOTInductor binding did not build ({type(e).__name__}: {str(e).strip()[:200]}); "
            "the compiled passes hold the GIL (other threads of the process wait for them)",
            stacklevel=2,
        )
        return False
    return True


def load_package(path: str) -> Any:
    """A package to run: on our binding where it builds, else torch's (aoti_load_package)."""
    if is_available():
        return Package(path)
    import torch._inductor as inductor

    return inductor.aoti_load_package(path)
