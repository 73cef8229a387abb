"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class ExportError(Exception):
    """An expected failure caused by the input (a file, a tensor, a flag), not by a bug."""


class ConfigError(ExportError):
    """A model configuration that is missing a field or does not describe a valid model."""


class CheckpointError(ExportError):
    """A checkpoint that cannot be read or does not match its configuration."""


def read_json_object(path, error: type[ExportError] = ExportError) -> dict:
    """A JSON object from a file, or one clear error naming the file."""
    import json

    try:
        d = json.loads(open(path, encoding="utf-8").read())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not readable JSON ({e})") from None
    if not isinstance(d, dict):
        raise error(f"{path}: expected a JSON object")
    return d
