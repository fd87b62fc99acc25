"""One exception hierarchy; the CLI turns every TrimodeError into a one-line error and exit 1."""


class TrimodeError(Exception):
    """Base class: the message must tell the user what to fix."""


class ConfigError(TrimodeError):
    """A config.json (or settings) value is missing or invalid."""


class CheckpointError(TrimodeError):
    """A checkpoint directory is incomplete or does not match its config."""


class InputError(TrimodeError):
    """Bad generation input: prompt, mode or sampling settings."""


class MissingDependencyError(TrimodeError):
    """An optional stack is not installed."""

    def __init__(self, package: str, extra: str):
        super().__init__(f"{package} is not installed: pip install 'trimode[{extra}]'")


class EngineError(TrimodeError):
    """An engine dir cannot be trusted or run here: tampered, built for other libraries or another
    device, or asked for a pass it was not built for. The message says what to rebuild."""


class NumericalError(TrimodeError):
    """The model produced non-finite values: broken weights or config."""


class OutputError(TrimodeError):
    """A stage cannot write its output directory where it was asked to."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) while a stage writes; the CLI exits 128 + signum, nothing left behind."""

    def __init__(self, signum: int = 2):
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum
