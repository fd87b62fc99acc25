"""Stage outputs: every command that writes a directory writes it through `stage_output`.

    from trimode.stage_output import stage_output, write_manifest

    with stage_output(out_dir, stage="quantize", inputs=[checkpoint_dir], force=force) as tmp_dir:
        ...                                   # write every file into tmp_dir
        write_manifest(tmp_dir, {"stage": "quantize", ...})
    # out_dir now holds exactly what was written into tmp_dir

What it guarantees:
- On entry, before any work: the paths are resolved; the output must not be "", ".", "/" (or the
  current directory), must not be, contain or lie inside any of `inputs`; an existing output must be
  a directory that is empty, or, with force=True, a previous output of the same stage (its
  manifest.json says `"stage": stage`); never an arbitrary directory, even with force. Its parent
  must be a directory (not a file, not under one) where we can create entries. `check_output` runs
  these checks alone (call it to fail before expensive imports).
- An exclusive lock (`flock` on `.<name>.lock` next to the output) is held for the whole run, so two
  runs to one output cannot both succeed: the second fails at once.
- Everything is written into a fresh temporary sibling `.<name>.<stage>-<random>` created here;
  a path this helper did not create is never touched. On success the manifest is checked and the
  sibling is renamed into place (a replaced previous output is moved aside first, then deleted).
- On any exception, Ctrl-C (SIGINT) or SIGTERM (raised as `Interrupted`) nothing is left behind:
  the sibling, the lock file and parent folders created for the output are removed. After a
  SIGKILL the lock file names the sibling that was being written; the next run to that output
  deletes it (and puts back a previous output that was moved aside), so a re-run succeeds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from trimode.errors import Interrupted, OutputError

MANIFEST = "manifest.json"


def check_output(out_dir: Path | str, stage: str, inputs: Iterable[Path | str] = (), force: bool = False) -> Path:
    """Validate an output directory without touching the file system; -> its resolved path."""
    if str(out_dir).strip() in ("", ".", "/"):
        raise OutputError(f"--out {str(out_dir)!r}: not a usable output directory (name a new folder)")
    out = Path(os.path.realpath(out_dir))
    if out.parent == out or out == Path.cwd().resolve() or out == Path.home().resolve():
        raise OutputError(f"--out {out_dir}: refusing to write a stage output over {out}")
    for given in inputs:
        inp = Path(os.path.realpath(given))
        if out == inp or inp in out.parents or out in inp.parents:
            relation = "is" if out == inp else "lies inside" if inp in out.parents else "contains"
            raise OutputError(f"--out {out_dir}: the output {relation} the input {given}; choose a folder outside it")
    _check_parent(out, out_dir)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputError(f"--out {out_dir}: exists and is not a directory")
        if any(out.iterdir()):
            previous = _stage_of(out)
            if not force:
                raise OutputError(
                    f"--out {out_dir}: exists and is not empty (--force replaces a previous {stage} output)"
                )
            if previous != stage:
                found = f"a {previous} output" if previous else f"not a trimode output (no {MANIFEST})"
                raise OutputError(
                    f"--out {out_dir}: {found}; --force only replaces a previous {stage} "
                    f"output, so remove it yourself or choose another folder"
                )
    return out


@contextlib.contextmanager
def stage_output(
    out_dir: Path | str, stage: str, inputs: Iterable[Path | str] = (), force: bool = False
) -> Iterator[Path]:
    """Check, lock, yield a fresh temporary sibling to write into, rename it into place (module doc)."""
    inputs = list(inputs)
    out = check_output(out_dir, stage, inputs, force)
    lock_path = out.parent / f".{out.name}.lock"
    tmp = out.parent / f".{out.name}.{stage}-{secrets.token_hex(4)}"
    old = out.parent / f".{out.name}.replaced-{secrets.token_hex(4)}"
    lock, created = None, []
    try:
        with _signals_raise():
            with _signals_deferred():  # set-up: a signal is handled once what it must undo is known
                created = make_dirs(out.parent, out_dir)
                lock = _lock(lock_path, out_dir)
                _recover(lock, out)
                check_output(out_dir, stage, inputs, force)  # again, now that no other run can write it
                _record(lock, tmp, old)
                _mkdir(tmp, out_dir)
            try:
                yield tmp
            except OSError as e:
                raise OutputError(f"{stage} {out_dir}: {e.strerror or e} ({e.filename or 'write failed'})") from e
            _check_manifest(tmp, stage)
            with _signals_deferred():  # the commit: a signal now is handled after it, never half-way
                replaced = out.exists()
                if replaced:
                    out.rename(old)
                tmp.rename(out)
                _record(lock, None, old if replaced else None)
                if replaced:
                    shutil.rmtree(old)
                _release(lock, lock_path)
    except BaseException:
        with _signals_deferred():
            shutil.rmtree(tmp, ignore_errors=True)
            if old.exists() and not out.exists():
                old.rename(out)  # put the previous output back
            _release(lock, lock_path)
            for d in reversed(created):
                with contextlib.suppress(OSError):
                    d.rmdir()
        raise


def write_manifest(out_dir: Path, manifest: dict) -> None:
    """manifest.json: what produced this folder; `"stage"` is what --force recognises. Replaced
    atomically (a temporary sibling, then a rename): one rewritten in place, as deploy's is after
    each stage, is either the old or the new one, never half of one."""
    if "stage" not in manifest:
        raise ValueError("a manifest names its stage")
    tmp = Path(out_dir) / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, Path(out_dir) / MANIFEST)


def input_digest(checkpoint_dir: Path) -> str:
    """sha256 over the checkpoint's small files in full and each safetensors file's header and size
    (hashing every weight byte of an 8B checkpoint would take minutes and prove little more).
    Python's bytecode caches are not content: a served repository gains them as Triton imports it."""
    h = hashlib.sha256()
    for path in sorted(
        p for p in checkpoint_dir.rglob("*") if p.is_file() and "__pycache__" not in p.relative_to(checkpoint_dir).parts
    ):
        h.update(str(path.relative_to(checkpoint_dir)).encode())
        if path.suffix == ".safetensors":
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                h.update(f.read(size))
            h.update(str(path.stat().st_size).encode())
        elif path.stat().st_size < 64 << 20:
            h.update(path.read_bytes())
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of every byte of one file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _stage_of(out: Path) -> str | None:
    try:
        stage = json.loads((out / MANIFEST).read_text()).get("stage")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return stage if isinstance(stage, str) else None


def _check_parent(out: Path, given) -> None:
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        where = "is a file" if ancestor == out.parent else f"lies under the file {ancestor}"
        raise OutputError(f"--out {given}: its parent {where}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"--out {given}: {ancestor} is not writable")


def make_dirs(parent: Path, given) -> list[Path]:
    """Create the folder and its missing parents; -> the ones created, outermost first (on a failure the
    ones made so far are removed again)."""
    missing = []
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    created: list[Path] = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            for c in reversed(created):
                with contextlib.suppress(OSError):
                    c.rmdir()
            raise OutputError(f"--out {given}: cannot create {d} ({e.strerror})") from None
        created.append(d)
    return created


def _mkdir(path: Path, given) -> None:
    try:
        path.mkdir()
    except OSError as e:
        raise OutputError(f"--out {given}: cannot write in {path.parent} ({e.strerror})") from None


def _lock(lock_path: Path, given):
    """An exclusive flock on lock_path; the inode check makes a lock on an unlinked file not count."""
    while True:
        try:
            f = open(lock_path, "a+")
        except OSError as e:
            raise OutputError(f"--out {given}: cannot write in {lock_path.parent} ({e.strerror})") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.close()
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OutputError(
                    f"--out {given}: another run is writing this output right now (lock {lock_path})"
                ) from None
            raise OutputError(f"--out {given}: cannot lock {lock_path} ({e.strerror})") from None
        try:
            if os.stat(lock_path).st_ino == os.fstat(f.fileno()).st_ino:
                return f
        except FileNotFoundError:
            pass
        f.close()  # the holder removed it as we opened it: take a fresh one


def _release(lock, lock_path: Path) -> None:
    """Unlink the lock file while holding the lock, then let go (a no-op when not locked)."""
    if lock is None or lock.closed:
        return
    with contextlib.suppress(OSError):
        lock_path.unlink()
    lock.close()


def _record(lock, tmp: Path | None, old: Path | None) -> None:
    """Write in the lock file what this run creates, for the next run after a SIGKILL."""
    lock.seek(0)
    lock.truncate()
    lock.write(json.dumps({"tmp": str(tmp) if tmp else None, "replaced": str(old) if old else None}))
    lock.flush()


def _recover(lock, out: Path) -> None:
    """Clean up after a run that was killed holding this lock (only the paths it recorded)."""
    lock.seek(0)
    try:
        record = json.loads(lock.read() or "{}")
    except ValueError:
        return
    for key in ("tmp", "replaced"):
        path = record.get(key)
        if (
            not isinstance(path, str)
            or Path(path).parent != out.parent
            or not Path(path).name.startswith(f".{out.name}.")
        ):
            continue  # only what a run of ours recorded for this very output
        path = Path(path)
        if key == "replaced" and path.is_dir() and not out.exists():
            path.rename(out)
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)


def _check_manifest(tmp: Path, stage: str) -> None:
    if _stage_of(tmp) != stage:
        raise AssertionError(f"the {stage} stage wrote no {MANIFEST} naming it")  # a bug in the stage


def _is_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM raises Interrupted (like Ctrl-C's KeyboardInterrupt), so cleanup runs."""
    if not _is_main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is done, then raise Interrupted. Python-level handlers, not
    a signal mask: a mask is per thread, and torch's worker threads would still take the signal."""
    if not _is_main_thread():
        yield
        return
    received: list[int] = []
    signums = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in signums}

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)

    try:
        yield
    except BaseException:
        restore()  # an exception is already on its way out: it wins over a late signal
        raise
    restore()
    if received:
        raise Interrupted(received[0])
