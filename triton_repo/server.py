"""A real tritonserver over a model repository: the one on PATH (NGC container), else the one in
the nvidia-pytriton wheel, set up as ../shared/notes/stack.md measured it works on a CPU machine:
a backend folder of symlinks to the wheel's python backend and its stub for this Python, this
interpreter's bin first on PATH (the stub finds trimode through `python3` on PATH) and its
LIBDIR on LD_LIBRARY_PATH. It serves a mirror of the repository in a scratch folder, which takes
the stubs' __pycache__ folders.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from trimode.errors import MissingDependencyError, TrimodeError


class ServerError(TrimodeError):
    """tritonserver did not start, or stopped."""


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @classmethod
    def free(cls) -> "Ports":
        """Three ports free on 127.0.0.1 right now (tests, benchmarks: never the defaults a user's server holds)."""
        socks = [socket.socket() for _ in range(3)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        ports = [s.getsockname()[1] for s in socks]
        for s in socks:
            s.close()
        return cls(*ports)


def check_host(host: str) -> None:
    """--host must be an address of this machine (or a name of one): checked before anything binds it,
    since tritonserver, or our port check, would blame the first port they bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as the ports are checked and served
    try:
        address = socket.getaddrinfo(host, 0, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)[0][4]
    except (OSError, UnicodeError, ValueError) as e:  # unknown name; a label too long; a NUL
        raise ServerError(
            f"--host {host}: not a valid IP address or a host name this machine knows "
            f"({getattr(e, 'strerror', None) or e})"
        ) from None
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind(address)  # port 0: any free one
        except OSError as e:
            raise ServerError(
                f"--host {host}: not an address of this machine ({e.strerror}); use 127.0.0.1, "
                f"0.0.0.0 (every interface) or one of its own addresses"
            ) from None


def find_tritonserver() -> tuple[Path, Path | None]:
    """-> (the tritonserver binary, the wheel's tritonserver folder, or None for the one on PATH)."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path), None
    try:
        import pytriton
    except ImportError:
        raise MissingDependencyError("nvidia-pytriton (or a tritonserver on PATH)", "serve") from None
    root = Path(pytriton.__file__).parent / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise ServerError(f"{root}: the nvidia-pytriton wheel holds no tritonserver; reinstall 'trimode[serve]'")
    return root / "bin" / "tritonserver", root


def _wheel_backends(root: Path, into: Path) -> Path:
    """<into>/python/: symlinks (a copied stub loses its library path) to the wheel's python backend."""
    python = into / "python"
    python.mkdir(parents=True)
    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    sources = [
        root / "backends" / "python" / "libtriton_python.so",
        root / "backends" / "python" / "triton_python_backend_utils.py",
        root / "python_backend_stubs" / minor / "triton_python_backend_stub",
    ]
    for source in sources:
        if not source.exists():
            raise ServerError(f"{source}: missing from the nvidia-pytriton wheel (Python {minor})")
        (python / source.name).symlink_to(source)
    return into


class TritonServer:
    """`with TritonServer(repo, host, ports) as server:` starts it, waits until every model is ready."""

    def __init__(
        self,
        repo_dir: Path,
        host: str = "127.0.0.1",
        ports: Ports = Ports(),
        log_path: Path | None = None,
        timeout_s: float = 300.0,
    ):
        self.repo_dir, self.host, self.ports = Path(repo_dir), host, ports
        self.log_path, self.timeout_s = log_path, timeout_s
        self.process: subprocess.Popen | None = None
        self._scratch: Path | None = None

    @property
    def endpoints(self) -> dict[str, str]:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return {
            "http": f"http://{host}:{self.ports.http}",
            "grpc": f"{host}:{self.ports.grpc}",
            "metrics": f"http://{host}:{self.ports.metrics}/metrics",
        }

    def command(self) -> tuple[list[str], dict[str, str]]:
        binary, wheel_root = find_tritonserver()
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        self._scratch = Path(tempfile.mkdtemp(prefix="trimode-triton-"))
        # Triton serves a mirror of the repository (its folders, links to its files): the python backend
        # stubs write each model.py's __pycache__ next to the path they import, and the repository must
        # stay what `trimode repo` wrote. Their embedded interpreter is isolated: it ignores
        # PYTHONDONTWRITEBYTECODE and PYTHONPYCACHEPREFIX.
        mirror = self._scratch / "repo"
        shutil.copytree(self.repo_dir.resolve(), mirror, copy_function=os.symlink)
        args = [
            str(binary),
            f"--model-repository={mirror}",
            f"--http-address={self.host}",
            f"--http-port={self.ports.http}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.ports.metrics}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--exit-on-error=true",
        ]
        if wheel_root is not None:
            args.append(f"--backend-directory={_wheel_backends(wheel_root, self._scratch / 'backends')}")
            libdir = sysconfig.get_config_var("LIBDIR")
            env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH")) if p)
        return args, env

    def start(self) -> "TritonServer":
        self._check_ports_free()  # else the readiness poll could find another server on them
        args, env = self.command()
        log = open(self.log_path, "ab") if self.log_path else None
        # its own process group: a Ctrl-C in our terminal reaches us, and we stop it in order
        self.process = subprocess.Popen(
            args, env=env, stdout=log, stderr=subprocess.STDOUT if log else None, start_new_session=True
        )
        if log:
            log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _check_ports_free(self) -> None:
        for kind, port in (("http", self.ports.http), ("grpc", self.ports.grpc), ("metrics", self.ports.metrics)):
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
                try:
                    s.bind((self.host, port))
                except OSError as e:
                    raise ServerError(
                        f"--{kind}-port {port}: cannot listen on {self.host}:{port} ({e.strerror}); choose another port"
                    ) from None

    def _wait_ready(self) -> None:
        url = f"{self.endpoints['http']}/v2/health/ready"
        deadline = time.monotonic() + self.timeout_s
        assert self.process is not None  # start() made it
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServerError(
                    f"tritonserver exited with status {code} while loading {self.repo_dir}{self._log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise ServerError(f"tritonserver not ready after {self.timeout_s:.0f} s{self._log_tail()}")

    def _log_tail(self) -> str:
        if not self.log_path or not Path(self.log_path).is_file():
            return ""
        lines = [ln for ln in Path(self.log_path).read_text(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("E") or "error" in ln.lower()]
        return f" (log {self.log_path}: {(errors or lines or [''])[-1].strip()[:400]})"

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (Triton unloads its models and exits), SIGKILL after timeout_s; -> its exit status."""
        code = None
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)  # its process group: the python backend stubs too
                code = self.process.wait()
        elif self.process is not None:
            code = self.process.returncode
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
        return code

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
