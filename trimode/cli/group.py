"""The trimode command group: the CLI's one exception boundary and its Ctrl-C handling. The
commands are registered on it in trimode/cli/__init__.py."""

from __future__ import annotations

import math
import re
import signal
import sys
import threading
import time

import click

from trimode.errors import InputError, Interrupted, TrimodeError


class TrimodeGroup(click.Group):
    """The one exception boundary: TrimodeError becomes a one-line error and exit 1; Ctrl-C (or
    SIGTERM while a stage writes) exits 128 + the signal number (130 for Ctrl-C)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """click's own main, except that Ctrl-C anywhere in it (parsing, where a --device check imports
        torch; the instant before or after the command) exits 130 like one inside the command, not
        with click's "Aborted!" and exit 1."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        previous = None
        try:  # a Ctrl-C that lands while the handler is being installed is caught here too
            if threading.current_thread() is threading.main_thread():
                previous = signal.getsignal(signal.SIGINT)
            _watch_ctrl_c()
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except (click.Abort, KeyboardInterrupt) as e:
            signum = getattr(e.__cause__ if isinstance(e, click.Abort) else e, "signum", 2)
            click.echo("Error: interrupted", err=True)
            sys.exit(128 + signum)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        sys.exit(code if isinstance(code, int) else 0)  # click returns the exit code of a ctx.exit(n)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            _interrupted(e)
        except Exception as e:
            if _CTRL_C:  # the Ctrl-C reached a child (a compiler, a worker) first, whose failure surfaced first
                _interrupted(Interrupted(_CTRL_C[0]))
            if not isinstance(e, TrimodeError):
                raise
            message = str(e)
            command = self.commands.get(ctx.invoked_subcommand or "")
            if isinstance(e, InputError) and command is not None:
                message = _as_typed(message, command)
            raise click.ClickException(message) from None


def _interrupted(e: KeyboardInterrupt):
    click.echo("Error: interrupted", err=True)
    raise click.exceptions.Exit(128 + getattr(e, "signum", 2)) from None


# Ctrl-C signals the whole foreground process group: a child process (the C++ compiler of a build, a
# compile worker) can die of it and its caller raise that failure before Python's KeyboardInterrupt
# lands. So a Ctrl-C is recorded here, and any error after one is reported as the interrupt it is.
_CTRL_C: list[int] = []
# A Ctrl-C within this long of the one raised last is only recorded: the first one's cleanup runs on (a
# double press, or `timeout -s INT`, which signals the process and then its group). Raised inside a
# `finally`, the second cut `trimode bench` short before it stopped its engine thread, which was
# still in a C++ pass when the interpreter exited: "terminate called", exit 134. A later Ctrl-C
# raises again (a library may swallow one and go on).
CLEANUP_GRACE_S = 5.0


def _watch_ctrl_c() -> None:
    """Install the SIGINT handler that records the signal (on the main thread only: signals go there)."""

    raised_at = -math.inf

    def on_sigint(signum, frame):
        nonlocal raised_at
        _CTRL_C.append(signum)
        if time.monotonic() - raised_at < CLEANUP_GRACE_S:
            return  # the cleanup of the one raised runs on
        raised_at = time.monotonic()
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():
        return
    _CTRL_C.clear()
    signal.signal(signal.SIGINT, on_sigint)


def _as_typed(message: str, command: click.Command) -> str:
    """Settings objects name their fields (max_new_tokens); say the option as typed (--max-new-tokens)."""
    for param in command.params:
        if isinstance(param, click.Option) and param.name and param.opts[0].startswith("--"):
            if "_" in param.name:
                message = re.sub(rf"(?<![\w.'-]){param.name}\b(?!')", param.opts[0], message)
            elif message.startswith(f"{param.name}:"):
                message = param.opts[0] + message[len(param.name) :]
    return message


@click.group(cls=TrimodeGroup)
@click.version_option(package_name="trimode")
def main() -> None:
    """Compile and deploy tri-mode diffusion language models (AR, block diffusion, self-speculation).

    Bad input gives one "Error:" line on stderr and exit status 1 (2 for a bad option); Ctrl-C
    exits 130. Commands that write a folder write all of it or nothing (see docs/guarantees.md).
    """
