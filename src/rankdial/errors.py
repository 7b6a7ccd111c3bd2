"""The errors rankdial raises for bad input: one small hierarchy, every class exported from `rankdial`.

Each message names the thing, the value and the fix. Every class also derives from the built-in exception a
Python user would expect (ValueError, KeyError, RuntimeError, TypeError), so `except ValueError` keeps working.
"""


class RankdialError(Exception):
    """Base class of every error rankdial raises on purpose."""


class ConfigError(RankdialError, ValueError):
    """A configuration value is invalid (one message lists every problem found)."""


class TargetError(RankdialError, ValueError):
    """target_modules, modules_to_save or a pattern does not fit the model, or a module cannot be wrapped."""


class AdapterError(RankdialError, KeyError):
    """An adapter name is unknown, already used, not a valid name, or the model has no adapters."""

    def __str__(self) -> str:  # KeyError would repr() the message and wrap it in quotes
        return str(self.args[0]) if self.args else ""


class AdapterFileError(RankdialError, ValueError):
    """An adapter folder or file cannot be read or does not fit the model."""


class MergeError(RankdialError, ValueError):
    """Merging an adapter would corrupt the base weights, or the layer's state does not allow it."""


class ModelError(RankdialError, ValueError):
    """A model folder is missing, incomplete, or not something transformers can load."""


class DataError(RankdialError, ValueError):
    """A training or evaluation data file is missing or malformed (the message names the file and line)."""


class TrainingError(RankdialError, RuntimeError):
    """Training cannot go on (a non-finite loss, an output folder in the way, a checkpoint that does not fit)."""


class TrainingInterrupted(TrainingError):
    """Ctrl-C (or SIGTERM) stopped a training run; the message says where, the last checkpoint and how to resume."""


class CheckpointError(RankdialError, ValueError):
    """A 4-bit model checkpoint folder is inconsistent or cannot be read."""


class OutputError(RankdialError, ValueError):
    """An output path would replace something rankdial did not write, or one of the command's own inputs."""


class RequestError(RankdialError, ValueError):
    """A serving request cannot be served as asked (larger than the server's limits, a reused id, a batch mismatch)."""


class AdapterInUse(AdapterError):
    """An adapter cannot be unloaded now: running requests use it (unload it when they finish)."""


class NameTaken(AdapterError):
    """An adapter name already stands for other weights (loaded from another folder): unload it first or choose
    another name. A server answers it with 409."""


class Unavailable(RankdialError, RuntimeError):
    """The server cannot take this request now (it is shutting down, or the adapter budget stays full); retry later
    or on another replica. A server answers it with 503."""


# -- writing messages: one home for the helpers every error message uses (serve/ and the command line) --------

NOT_UTF8 = "is not valid Unicode (it holds a lone surrogate such as \\ud800); send text that encodes as UTF-8"


def one_line(text) -> str:
    """An error (or any text) on one line: its lines stripped and joined by spaces; None gives ""."""
    return " ".join(line.strip() for line in str("" if text is None else text).splitlines() if line.strip())


def shorten(value, limit: int = 60) -> str:
    """A value someone sent, as an error echoes it: quoted (repr), cut to about `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else repr(str(value)[:limit - 3]) + "..."


def not_utf8(text: str) -> bool:
    """Whether `text` cannot be encoded as UTF-8 (JSON lets a lone surrogate such as \\ud800 through)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


__all__ = ["RankdialError", "ConfigError", "TargetError", "AdapterError", "AdapterFileError", "MergeError",
           "ModelError", "DataError", "TrainingError", "TrainingInterrupted", "CheckpointError", "OutputError",
           "RequestError", "AdapterInUse", "Unavailable"]
