"""User-facing errors: each names the file, key or value at fault and what was expected."""


class SynQTError(Exception):
    """Base class; the CLI prints these without a traceback and exits with status 2."""


class ConfigError(SynQTError, ValueError):
    """A config or sweep file (or a key=value override) is wrong."""


class DataError(SynQTError, ValueError):
    """A dataset folder, list file, image or label is wrong."""


class ModelError(SynQTError, ValueError):
    """A backbone cannot be served, or a checkpoint does not fit it."""
