"""The errors rankdial raises for bad input. Each message names the thing, the value and the fix."""


class RankdialError(Exception):
    """Base class of every error rankdial raises on purpose."""


class ConfigError(RankdialError, ValueError):
    """A configuration value is invalid (one message lists every problem found)."""


class TargetError(RankdialError, ValueError):
    """target_modules, modules_to_save or a pattern does not fit the model."""


class AdapterError(RankdialError, KeyError):
    """An adapter name is unknown, already used, or not a valid name."""

    def __str__(self) -> str:  # KeyError would repr() the message and wrap it in quotes
        return str(self.args[0]) if self.args else ""


class AdapterFileError(RankdialError, ValueError):
    """An adapter folder or file cannot be read or does not fit the model."""


class MergeError(RankdialError, ValueError):
    """Merging an adapter would corrupt the base weights, or the layer's state does not allow it."""
