"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class ExportError(Exception):
    """An expected failure caused by the input (a file, a tensor, a flag), not by a bug."""


class ConfigError(ExportError):
    """A model configuration that is missing a field or does not describe a valid model."""


class CheckpointError(ExportError):
    """A checkpoint that cannot be read or does not match its configuration."""


# What numpy, torch and ONNX Runtime say when an allocation fails (numpy raises MemoryError; torch
# and ONNX Runtime raise RuntimeError); each names the bytes it asked for.
_ALLOCATION_WORDS = ("not enough memory", "can't allocate memory", "cannot allocate memory", "failed to allocate",
                     "bad_alloc", "unable to allocate")


def allocation_failure(e: BaseException) -> str | None:
    """The first line of an allocation failure's message, else None (not an allocation failure)."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and any(w in text.lower() for w in _ALLOCATION_WORDS)):
        return first
    return None


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
