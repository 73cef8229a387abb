"""Progress reporting: long work (build, verify) reports stages here; the CLI passes rich progress
bars, the Python API a silent reporter."""

from __future__ import annotations

from typing import Callable


class Reporter:
    """Progress sink. `stage(name, total)` starts a stage and returns its advance(n) callback."""

    def stage(self, name: str, total: int | None = None) -> Callable[[int], None]:
        return lambda n=1: None

    def done(self, name: str) -> None:
        pass
