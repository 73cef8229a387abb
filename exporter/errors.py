"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class ExportError(Exception):
    """An expected failure caused by the input (a file, a tensor, a flag), not by a bug."""


class ConfigError(ExportError):
    """A model configuration that is missing a field or does not describe a valid model."""


class CheckpointError(ExportError):
    """A checkpoint that cannot be read or does not match its configuration."""
