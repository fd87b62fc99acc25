"""A real tritonserver over a model repository: the one on PATH (NGC container), else the one in
the nvidia-pytriton wheel, set up as ../shared/notes/stack.md measured it works on a CPU machine:
a backend folder of symlinks to the wheel's python backend and its stub for this Python, this
interpreter's bin first on PATH (the stub finds trimode through `python3` on PATH) and its
LIBDIR on LD_LIBRARY_PATH. It serves a mirror of the repository in a scratch folder, which takes
the stubs' __pycache__ folders.

Lifecycle (what `trimode serve` and its supervisor rely on; docs/serving.md, Operations):
- Liveness. Triton 2.51 does not notice a python backend stub that dies (killed, out of memory): it stays
  ready, its requests hang, new ones fail. A watchdog thread polls every stub (and tritonserver) twice a
  second; when one is gone it SIGKILLs tritonserver's process group, so clients see their connections
  drop and readiness stops answering, and records `failure`, on which `trimode serve` exits non-zero.
- Drain. tritonserver gets TRIMODE_DRAIN_FILE (the stubs inherit it): once that file exists the engine
  model refuses new requests (UNAVAILABLE) and writes `<file>.done` when nothing is left in flight
  (loop.py). `drain()` waits for that; `stop()` then SIGTERMs tritonserver, whose unload is clean with
  nothing in flight. With requests in flight Triton's own SIGTERM refuses the ensembles' later steps and
  hangs past its 30 s exit timeout, so `stop()` of a busy server SIGKILLs the process group instead.
- Shared memory. Each server's python backend regions in /dev/shm carry a prefix of its own, removed
  after tritonserver exits, also after a SIGKILL.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from trimode.errors import MissingDependencyError, TrimodeError


class ServerError(TrimodeError):
    """tritonserver did not start, or stopped."""


SHM_DIR = Path("/dev/shm")
WATCH_INTERVAL_S = 0.5  # how often the watchdog looks at the stubs
IDLE_GRACE_S = 1.0  # how long stop() waits for an idle engine model to confirm it (it looks every 50 ms)
STUB = "triton_python_backend_stub"


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
        threads: int | None = None,
    ):
        """threads: the engine model's torch threads, over the repository's (settings.py)."""
        self.repo_dir, self.host, self.ports = Path(repo_dir), host, ports
        self.log_path, self.timeout_s, self.threads = log_path, timeout_s, threads
        self.process: subprocess.Popen | None = None
        self._scratch: Path | None = None
        self.shm_prefix = f"trimode_{os.getpid()}_{secrets.token_hex(4)}_"  # its /dev/shm regions
        self.failure: str | None = None  # why it died under us (the watchdog's finding)
        self._failed = threading.Event()
        self._unwatch = threading.Event()
        self._watchdog: threading.Thread | None = None

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
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]
        env["TRIMODE_DRAIN_FILE"] = str(self._drain_path)  # the engine model reads it (module doc)
        # the thread layout (settings.py DEFAULT_ENGINE_THREADS): one OpenMP thread in every stub but the
        # engine's, which sets its own; a user's OMP_NUM_THREADS stands
        env.setdefault("OMP_NUM_THREADS", "1")
        if self.threads:
            env["TRIMODE_ENGINE_THREADS"] = str(self.threads)
        if wheel_root is not None:
            args.append(f"--backend-directory={_wheel_backends(wheel_root, self._scratch / 'backends')}")
            libdir = sysconfig.get_config_var("LIBDIR")
            env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH")) if p)
        return args, env

    def start(self) -> "TritonServer":
        self._unwatch.clear()
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
            stubs = self._stubs()  # every model is loaded: each python model instance has its stub
        except BaseException:
            self.stop()
            raise
        self._watchdog = threading.Thread(target=self._watch, args=(stubs,), name="triton-watchdog", daemon=True)
        self._watchdog.start()
        return self

    @property
    def _drain_path(self) -> Path:
        assert self._scratch is not None  # command() made it
        return self._scratch / "drain"

    def _stubs(self) -> dict[int, tuple[str, str]]:
        """tritonserver's python backend stubs: pid -> (the model it runs, its start time)."""
        assert self.process is not None
        stubs = {}
        for entry in Path("/proc").iterdir():
            fields = _proc_stat(entry.name) if entry.name.isdigit() else None
            if fields is None or int(fields[1]) != self.process.pid:
                continue
            try:
                args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if Path(args[0]).name == STUB and len(args) > 1:  # args[1]: <mirror>/<model>/<version>/model.py
                stubs[int(entry.name)] = (Path(args[1]).parent.parent.name, fields[19])
        return stubs

    def _watch(self, stubs: dict[int, tuple[str, str]]) -> None:
        assert self.process is not None
        while not self._unwatch.wait(WATCH_INTERVAL_S):
            # the stubs first: a dead stub can make tritonserver abort within the same interval, and
            # the stub is the cause to name
            dead = next((d for d in (_dead_stub(pid, *seen) for pid, seen in stubs.items()) if d), None)
            code = self.process.poll()
            if dead is not None:
                also = "" if code is None else f" (tritonserver then exited with status {code})"
                self._fail(
                    f"the python backend stub of {dead}{also}; Triton cannot serve that model again, so "
                    f"tritonserver was stopped: restart the server"
                )
                return
            if code is not None:
                self._fail(f"tritonserver (pid {self.process.pid}) exited with status {code}")
                return

    def _fail(self, message: str) -> None:
        """Stop at once: in-flight requests to a dead stub would hang, and readiness would stay true."""
        self.failure = message
        self._kill_group()
        self._failed.set()

    def wait_failed(self, timeout_s: float) -> bool:
        """True once the watchdog found tritonserver or one of its stubs dead (`failure` says which)."""
        return self._failed.wait(timeout_s)

    def drain(self, timeout_s: float, frontend=None, cut: threading.Event | None = None) -> bool:
        """Stop admitting (the engine model answers UNAVAILABLE; frontend, an OpenAIFrontend, 503) and wait
        until every request accepted has finished: -> True; False when timeout_s passed first, cut was set,
        or the server died. stop() next."""
        if frontend is not None:
            frontend.start_draining()
        deadline = time.monotonic() + timeout_s
        done = self._drain_path.with_name(self._drain_path.name + ".done")  # loop.py writes it
        self._drain_path.touch()
        while not (done.exists() and (frontend is None or frontend.num_in_flight == 0)):
            is_dead = self.process is None or self.process.poll() is not None or self._failed.is_set()
            if is_dead or time.monotonic() >= deadline or (cut is not None and cut.is_set()):
                return False
            time.sleep(0.05)
        return True

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
        return f" (log {self.log_path}: {log_cause(Path(self.log_path).read_text(errors='replace'))})"

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """Stop now. An idle server (a drained one) gets SIGTERM, then SIGKILL after timeout_s; a busy one
        SIGKILL at once, which cuts what is in flight (module doc). Then its process group, scratch folder and
        /dev/shm regions are removed. -> its exit status."""
        self._unwatch.set()  # the stubs exit when Triton unloads their models
        if self._watchdog is not None:
            self._watchdog.join()
        code = None
        if self.process is not None:
            if self.process.poll() is None and self._is_idle():
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    pass
            self._kill_group()  # a busy or hung server; or the stubs of a tritonserver that died first
            code = self.process.wait()
            self._wait_group_gone()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
        for region in SHM_DIR.glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)
        return code

    def _is_idle(self) -> bool:
        """Admit nothing more, and say whether the engine model has nothing in flight (a drain's end)."""
        if self._scratch is None:
            return False
        done = self._drain_path.with_name(self._drain_path.name + ".done")
        if self._drain_path.exists():  # after a drain: it had its time
            return done.exists()
        self._drain_path.touch()
        deadline = time.monotonic() + IDLE_GRACE_S
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return done.exists()

    def _wait_group_gone(self, timeout_s: float = 5.0) -> None:
        """Until the stubs SIGKILL reached have exited too (a stub with a large heap takes a moment)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def _kill_group(self) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # its own session: tritonserver and its stubs
        except ProcessLookupError:
            pass  # nothing left in it

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _dead_stub(pid: int, model: str, started: str) -> str | None:
    """How a stub that is no longer running died, as "model 'M' (pid P) <how>"; None while it runs."""
    fields = _proc_stat(str(pid))
    if fields is None or fields[19] != started:  # reaped (its pid may be another's now)
        how = "is gone"
    elif fields[0] in "ZX":  # a zombie: dead, its exit status still readable
        how = _wait_status(int(fields[49])) if len(fields) > 49 else "exited"
    else:
        return None
    return f"model '{model}' (pid {pid}) {how}"


def _proc_stat(pid: str) -> list[str] | None:
    """/proc/PID/stat's fields after the command name: [0] state, [1] ppid, [19] start time, [49] exit code."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def log_cause(log: str) -> str:
    """The line of a tritonserver log that says why it stopped: the first model that failed to load
    (its error, without the Python frames Triton appends), else the last error line, else the last."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    failed = [ln for ln in lines if "failed to load '" in ln]
    if failed:
        cause = failed[0][failed[0].index("failed to load '") :]
        return cause.split("\\n\\nAt:")[0].split("\\n")[0][:400]
    errors = [ln for ln in lines if ln.startswith("E") or "error" in ln.lower()]
    return (errors or lines or [""])[-1][:400]


def _wait_status(status: int) -> str:
    """A wait status (/proc's exit code of a zombie) in words."""
    number = status & 0x7F
    if not number:
        return f"exited with status {status >> 8}"
    try:
        return f"was killed by signal {number} ({signal.Signals(number).name})"
    except ValueError:  # a real-time signal has no name
        return f"was killed by signal {number}"
