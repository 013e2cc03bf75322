"""Project exceptions: every user-facing failure is an LLMError with a one-line message."""

DETAIL_CHARS = 300  # longest foreign exception text quoted in a one-line message


class LLMError(Exception):
    """Base class for errors a user can fix (bad params, bad data, missing files)."""


class ConfigError(LLMError):
    """A params.yaml value is unknown, of the wrong type, out of range or inconsistent."""


class DataError(LLMError):
    """Input data is missing, corrupt, empty, not UTF-8, or could not be downloaded."""


class TokenizerError(LLMError):
    """A tokenizer cannot be trained, loaded or used as asked."""


class CheckpointError(LLMError):
    """A checkpoint or model file is missing, corrupt, or does not match its inputs."""


class OutputError(LLMError):
    """An output cannot be written: a folder on its path is a file, it is itself a folder, no access."""


class Interrupted(Exception):
    """Training stopped on SIGINT or SIGTERM after saving its state; the exit status is 128 + signum."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def shorten(text: str, limit: int = DETAIL_CHARS) -> str:
    """`text` on one line (whitespace collapsed, every line kept), cut at `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def one_line(exc: BaseException, limit: int = DETAIL_CHARS) -> str:
    """`exc` as `Type: message` on one line, for quoting inside an LLMError (see `shorten`); an empty
    message (EOFError from a 0-byte file) gives the type alone."""
    text = shorten(str(exc), limit)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
