"""AOTInductor packages loaded through a binding of our own, which lets go of the GIL during a pass.

torch's Python binding of the package loader (`torch._C._aoti.AOTIModelPackageLoader`) keeps the
GIL for the whole pass, so no other thread of the process runs Python meanwhile: in the Triton
engine model neither the thread sending the last step's responses nor the stub's own threads
(new requests, cancellations). Measured in docs/performance.md ("Pass efficiency"). This binding
wraps the same C++ loader (`torch::inductor::AOTIModelPackageLoader`) and runs `boxed_run` under
`py::gil_scoped_release`; torch's binding cannot be reused from an extension (pybind refuses the
cast). It is compiled once per machine, torch version and source on first use (torch.utils.cpp_extension
and ninja, about 30 s, kept in ~/.cache/trimode); where that fails (no compiler, headers or ninja,
or a build past BUILD_TIMEOUT_S), the packages load through torch's binding as before, with one warning.
The build runs in a child process, in a folder of its own, and moves the library into place when
done: torch's build lock, which a second process waits on for ever (and a killed build leaves
behind), is never shared.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
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


NAME = "trimode_aoti_loader"
BUILD_TIMEOUT_S = 300.0  # about 30 s on a 2-core box; longer, and the packages load through torch's binding
_BUILD = (
    "import sys; from torch.utils.cpp_extension import load_inline; "
    "load_inline(sys.argv[1], cpp_sources=[sys.stdin.read()], build_directory=sys.argv[2], verbose=False)"
)


def library_path() -> Path:
    """Where the compiled binding lives: one file per torch version, Python version and source."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trimode"
    digest = hashlib.sha256(_SOURCE.encode()).hexdigest()[:12]
    return cache / f"{NAME}-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{digest}.so"


@functools.cache
def _extension() -> Any:
    path = library_path()
    if not path.is_file():
        build(path)
    spec = importlib.util.spec_from_file_location(NAME, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(path: Path) -> None:
    """Compile the binding to `path`: in a child process (its whole process group killed past
    BUILD_TIMEOUT_S), in a temporary folder beside `path`, then one atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as folder:
        child = subprocess.Popen(
            [sys.executable, "-c", _BUILD, NAME, folder],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its compiler and linker are killed with it
        )
        try:
            output, _ = child.communicate(_SOURCE, timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            raise RuntimeError(f"the build took over {BUILD_TIMEOUT_S:g} s and was stopped") from None
        if child.returncode != 0:
            lines = output.strip().splitlines()
            raise RuntimeError(lines[-1] if lines else f"the build exited with status {child.returncode}")
        os.replace(Path(folder) / f"{NAME}.so", path)


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
