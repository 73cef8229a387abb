"""Checkpoints by Hugging Face id: `ORG/NAME` (at `--revision`) resolved through huggingface_hub,
the local cache first (offline works; the cache is where huggingface_hub keeps it, HF_HOME /
HF_HUB_CACHE), a download of the weights, configs and tokenizer when the hub can be reached.

A folder of that name in the working directory wins over the id: `./ORG/NAME` is a path."""

from __future__ import annotations

import re
from pathlib import Path

from dsv3_export.core.errors import CheckpointError

CONFIG = ["config.json"]

ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# What a build reads: configs, the index, the weights, the tokenizer. No pickles, no code.
PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.tiktoken"]


def is_hub_id(spec) -> bool:
    """An ORG/NAME that is not a path here."""
    return isinstance(spec, str) and bool(ID.match(spec)) and not Path(spec).exists()


def resolve(spec: str, revision: str | None = None, *, log=None, config_only: bool = False) -> Path:
    """The local snapshot folder of model `spec` at `revision` (default: main), downloading it when
    it is not cached and the hub can be reached; else one CheckpointError saying what to run.
    `config_only`: config.json alone (sizing needs no weights)."""
    from huggingface_hub import constants, snapshot_download  # lazy: only ids need it
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"@{revision}" if revision else ""
    cache = constants.HF_HUB_CACHE
    patterns = CONFIG if config_only else PATTERNS
    try:
        found = Path(snapshot_download(spec, revision=revision, allow_patterns=patterns, local_files_only=True))
        if not config_only or (found / "config.json").is_file():
            return found
    except (LocalEntryNotFoundError, FileNotFoundError):
        pass  # not cached (or not whole): ask the hub
    except HFValidationError as e:
        raise CheckpointError(f"{spec}{at}: not a Hugging Face model id ({e})") from None
    how = (f"on a machine that reaches the hub run `hf download {spec}"
           f"{' --revision ' + revision if revision else ''}` (it fills {cache}), or give a checkpoint folder")
    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(f"{spec}{at}: not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set; {how}")
    if log is not None:
        log(f"{spec}{at}: not in the Hugging Face cache ({cache}); downloading it")
    try:
        return Path(snapshot_download(spec, revision=revision, allow_patterns=patterns))
    except GatedRepoError:
        raise CheckpointError(f"{spec}: a gated model: accept its terms on huggingface.co and log in "
                              "(`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{spec}: no such model on the Hugging Face hub (a private one needs "
                              "`hf auth login` or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{spec}: no revision {revision!r} on the Hugging Face hub") from None
    except (OSError, ValueError) as e:  # no network, a proxy, a full disk: huggingface_hub's errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{spec}{at}: not in the Hugging Face cache ({cache}) and the download failed "
                              f"({first}); {how}") from None
