"""The output directory of a build, written atomically (docs/reliability.md, "Interruption and full disks").

A build writes into a temporary sibling `.OUT.tmp-PID` (marked as ours by a `.dsv3-export-tmp`
file) and renames it onto OUT only when everything succeeded. Around that:
- OUT may never be, contain, or sit inside the source checkpoint, nor be the working directory or
  one above it: nothing the build did not create is ever deleted or replaced;
- `--force` replaces an existing OUT only when it is a dsv3-export build (it has manifest.json) or
  an empty directory; an OUT that appears while building is not replaced without `--force`;
- one build at a time per OUT (an exclusive lock on `.OUT.lock`);
- SIGTERM and SIGINT remove the temporary before the process ends; temporaries of processes that
  died (SIGKILL, power loss) are swept by the next build to the same OUT;
- a full disk is one line naming the folder, never a traceback.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dsv3_export.core.build_dir import MANIFEST, TMP_MARK
from dsv3_export.core.errors import ExportError


def check_output(out: Path, source_dir: Path | None) -> Path:
    """OUT resolved, or ExportError when writing it could touch what is not ours."""
    target = Path(os.path.abspath(out))
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ExportError(f"-o {out}: is the current directory or one above it; give a new folder for the build")
    if source_dir is not None:
        src = Path(source_dir).resolve()
        if resolved == src or src in resolved.parents or resolved in src.parents:
            raise ExportError(f"-o {out}: is, contains or sits inside the source checkpoint {src}; the build "
                              "must go elsewhere")
    return target


def _replaceable(out: Path) -> bool:
    return (out / MANIFEST).is_file() or (out.is_dir() and not any(out.iterdir()))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale(parent: Path, name: str) -> list[Path]:
    """Remove our temporaries of OUT left by processes that are gone; returns what was removed."""
    removed = []
    for path in parent.glob(f".{name}.*-*"):
        kind, _, pid = path.name[len(name) + 2:].partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or not (path / TMP_MARK).is_file():
            continue
        if int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextmanager
def _lock(parent: Path, name: str) -> Iterator[None]:
    path = parent / f".{name}.lock"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExportError(f"{parent / name}: another build to this directory is running; wait for it") from None
        yield
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


@contextmanager
def _terminated_as_exit() -> Iterator[None]:
    """SIGTERM raises SystemExit (as SIGINT raises KeyboardInterrupt), so cleanup code runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def atomic_dir(out: Path, force: bool, source_dir: Path | None = None) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `out`; rename it onto `out` only when the block succeeds."""
    out = check_output(out, source_dir)
    if out.exists() and not force:
        raise ExportError(f"{out}: already exists (use --force to replace it)")
    if out.exists() and not _replaceable(out):
        raise ExportError(f"{out}: exists and is not a dsv3-export build (no {MANIFEST}); refusing to replace it")
    parent = out.parent
    if not parent.is_dir():
        raise ExportError(f"{parent}: output directory's parent does not exist")
    with _lock(parent, out.name), _terminated_as_exit():
        sweep_stale(parent, out.name)
        tmp = parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / TMP_MARK).touch()
        try:
            yield tmp
            (tmp / TMP_MARK).unlink()
            _replace(out, tmp, force)
        except BaseException as e:
            full = _disk_full(e, parent)  # measured before the temporary is removed
            shutil.rmtree(tmp, ignore_errors=True)
            if full:
                raise ExportError(f"{parent}: No space left on device while writing {out.name}; nothing was "
                                  "left behind: free some space and build again") from None
            raise


DISK_FULL_BYTES = 4 << 20  # a write that failed with less than this left free failed for want of space


def _disk_full(e: BaseException, folder: Path) -> bool:
    """Whether a build failed because its disk filled: ENOSPC, or a failure that says no errno
    (numpy's tofile: "N requested and M written"; ONNX Runtime: "Failed to write external
    initializers") while the disk has almost nothing left."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    if not isinstance(e, (OSError, ExportError)) or (isinstance(e, OSError) and e.errno not in (None, errno.EIO)):
        return False
    try:
        return shutil.disk_usage(folder).free < DISK_FULL_BYTES
    except OSError:
        return False


def _replace(out: Path, tmp: Path, force: bool) -> None:
    if out.exists():
        if not force:
            raise ExportError(f"{out}: appeared while building; not replaced (use --force to replace it)")
        if not _replaceable(out):
            raise ExportError(f"{out}: appeared while building and is not a dsv3-export build; not replaced")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        (old / TMP_MARK).touch()  # ours now: a crash before the next line leaves it to the sweep
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
