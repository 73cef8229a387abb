"""Finding and running the real `tritonserver` over a repository (docs/triton.md).

Where the binary comes from, first found wins:
1. `DSV3_TRITONSERVER`: a tritonserver binary, or the folder of a Triton install (NVIDIA's container
   has it at /opt/tritonserver), with its `backends/` beside `bin/`;
2. the PyPI wheel nvidia-pytriton, installed without its dependencies
   (`pip install --no-deps nvidia-pytriton==0.7.0`: it pins numpy<2 and client packages that must
   not downgrade ours). It carries `pytriton/tritonserver/bin/tritonserver` (Triton 2.51) with the
   python backend only, its libraries in `nvidia_pytriton.libs/`, and one python stub per CPython
   version (`python_backend_stubs/3.8` … `3.13`). We never import pytriton.

What the server needs, as pytriton's own launcher (pytriton/server/triton_server.py, triton.py) sets
it up: the bundled libraries on LD_LIBRARY_PATH; a backend directory whose `python/` holds
libtriton_python.so, triton_python_backend_utils.py and the stub built for the running interpreter's
X.Y (pytriton copies them into a workspace; we link them into a temporary folder); and the Python
environment's `bin/` first on PATH, because the stub embeds libpython and takes its prefix (stdlib,
site-packages) from the `python3` it finds there.

Why a separate environment for the stub: the wheel's stubs were built against numpy 1.x, and under
numpy 2 they read tensors wrongly (an FP32 [1, 2, 3] arrives as [1, 1, 1]; strings fail to
unpack): the layout of numpy's dtype struct changed. So the stub runs in a virtual environment over
this interpreter (system site-packages: our package, onnxruntime, tokenizers) with numpy<2 installed
inside it, which shadows ours for the stub only. `stub_environment` makes it once, with pip, under
~/.cache/dsv3-export (or uses `DSV3_TRITON_PYTHON`, or this environment when its numpy is already 1.x).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from dsv3_export.core.errors import ExportError
from dsv3_export.core.http_limits import CLIENT_TIMEOUT_S
from dsv3_export.deploy.guard import GuardServer
from dsv3_export.deploy.model_config import parse

ENV_BINARY = "DSV3_TRITONSERVER"
ENV_PYTHON = "DSV3_TRITON_PYTHON"
PYTRITON = "nvidia-pytriton==0.7.0"
INSTALL_HINT = (f"pip install --no-deps {PYTRITON} (it carries tritonserver with the python backend), or set "
                f"{ENV_BINARY} to a tritonserver binary")
STUB_NUMPY = "numpy>=1.26,<2"  # what the stubs of the wheel were built against
STUB = "triton_python_backend_stub"
PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
READY_TIMEOUT_S, READY_PAUSE_S = 240.0, 0.5  # model loading: every stub starts a Python interpreter
EXIT_TIMEOUT_S = 15  # Triton's --exit-timeout-secs: in-flight requests get this long after a signal
STOP_GRACE_S = EXIT_TIMEOUT_S + 30  # then we kill what is left of the process group
# After the guard has ended its requests, the text model's scheduler still finishes the step it is
# in; tritonserver is signalled only once no stage model has executed for QUIET_S (at most DRAIN_S):
# a scheduler calling a stage model (BLS) that tritonserver is unloading can crash it.
QUIET_S, DRAIN_S = 1.0, 10.0
ENV_CHECK_TIMEOUT_S, PIP_TIMEOUT_S = 120, 900


@dataclass
class Installation:
    """A tritonserver binary and what it needs: `backends` (a full install's backend folder) or, for
    the pytriton wheel, `python_backend` (libtriton_python.so and friends) and `stubs`."""

    binary: Path
    libs: list[Path] = field(default_factory=list)
    backends: Path | None = None
    python_backend: Path | None = None
    stubs: Path | None = None


def find_tritonserver() -> Installation:
    """The tritonserver to run (module docstring), or one line on how to get it."""
    given = os.environ.get(ENV_BINARY)
    if given:
        path = Path(given).expanduser()
        binary = path / "bin" / "tritonserver" if path.is_dir() else path
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            raise ExportError(f"{ENV_BINARY}={given}: no executable tritonserver there")
        root = binary.parent.parent
        if (root / "python_backend_stubs").is_dir():  # an unpacked pytriton wheel
            return _pytriton_layout(root)
        return Installation(binary, libs=[root / "lib"], backends=root / "backends")
    spec = importlib.util.find_spec("pytriton")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ExportError(f"tritonserver is not installed here: {INSTALL_HINT}")
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise ExportError(f"{root}: the pytriton package has no tritonserver binary; {INSTALL_HINT}")
    return _pytriton_layout(root)


def _pytriton_layout(root: Path) -> Installation:
    libs = root.parent.parent / "nvidia_pytriton.libs"  # the wheel's vendored libraries (auditwheel)
    return Installation(root / "bin" / "tritonserver", libs=[libs] if libs.is_dir() else [],
                        python_backend=root / "backends" / "python", stubs=root / "python_backend_stubs")


def backend_directory(inst: Installation, workdir: Path) -> Path:
    """--backend-directory: a full install's own, or for the wheel a folder of links in `workdir`
    with the python backend and the stub of this interpreter's version."""
    if inst.backends is not None:
        return inst.backends
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = inst.stubs / version / STUB
    if not stub.is_file():
        have = sorted(p.name for p in inst.stubs.iterdir()) if inst.stubs.is_dir() else []
        raise ExportError(f"{inst.stubs}: no python backend stub for Python {version} (it has {', '.join(have)})")
    python = workdir / "backends" / "python"
    python.mkdir(parents=True)
    for name in PYTHON_BACKEND_FILES:
        (python / name).symlink_to(inst.python_backend / name)
    (python / STUB).symlink_to(stub)
    return workdir / "backends"


def backends_needed(repo: Path) -> dict[str, str]:
    """{model: backend} of every model in the repository (platform tensorrt_plan = backend tensorrt)."""
    out = {}
    for config in sorted(Path(repo).glob("*/config.pbtxt")):
        cfg = parse(config.read_text(), str(config))
        out[cfg.name] = cfg.backend or {"tensorrt_plan": "tensorrt", "onnxruntime_onnx": "onnxruntime"}.get(
            cfg.platform, cfg.platform)
    return out


# ---- the python stub's environment ----------------------------------------------------------------
def _source_root() -> Path | None:
    """The folder our packages are imported from when it is a source checkout (not site-packages),
    for the stub's PYTHONPATH: then it imports exactly the code that wrote the repository."""
    root = Path(__file__).resolve().parent.parent
    return None if root.name in ("site-packages", "dist-packages") else root


def _python_of(env: Path) -> Path:
    return env / "bin" / "python3"


def _numpy_major(python: Path, env: dict[str, str]) -> int:
    probe = ("import numpy, onnxruntime, tokenizers, dsv3_export.engines.scheduler, dsv3_export.deploy.llm; "
             "print(numpy.__version__)")
    try:
        out = subprocess.run([str(python), "-c", probe], check=False, env=env, capture_output=True, text=True,
                             timeout=ENV_CHECK_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ExportError(f"{python}: cannot run it ({e})") from None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise ExportError(f"{python}: the python backend's environment cannot import our packages: {last}")
    return int(out.stdout.strip().split(".")[0])


def _default_env_path() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tag = hashlib.sha256(sys.prefix.encode()).hexdigest()[:10]
    return cache / "dsv3-export" / f"triton-python{sys.version_info.major}.{sys.version_info.minor}-{tag}"


def _our_site_dirs() -> list[str]:
    """The site-packages folders this interpreter imports from: a virtualenv's own first (its
    packages are invisible to `venv --system-site-packages`, which sees the base interpreter's)."""
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    return list(dict.fromkeys(d for d in dirs if Path(d).is_dir()))


def _see_our_packages(env: Path) -> None:
    """A .pth file in the new environment that adds this interpreter's site-packages after its own
    (its numpy<2 first) with site.addsitedir, so that their own .pth files (editable installs) run too."""
    purelib = Path(sysconfig.get_paths(vars={"base": str(env), "platbase": str(env)})["purelib"])
    purelib.mkdir(parents=True, exist_ok=True)
    lines = [f"import site; site.addsitedir({d!r})" for d in _our_site_dirs()]
    (purelib / "dsv3_export_parent.pth").write_text("\n".join(lines) + "\n")


def _make_env(path: Path, log) -> None:
    """A virtual environment over this interpreter, seeing its packages (a virtualenv's included),
    with numpy<2 inside."""
    log(f"preparing the python backend's environment (numpy<2 for Triton's stub) in {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for cmd in ([sys.executable, "-m", "venv", "--system-site-packages", str(tmp)],
                    [str(_python_of(tmp)), "-m", "pip", "install", "-q", "--no-deps",
                     "--disable-pip-version-check", STUB_NUMPY]):
            done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise ExportError(f"preparing {path} failed ({' '.join(cmd[1:4])}): {last}; or set {ENV_PYTHON} to "
                                  f"a Python environment of this interpreter's version with {STUB_NUMPY}")
            if cmd[1:3] == ["-m", "venv"]:
                _see_our_packages(tmp)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stub_environment(env: dict[str, str], numpy1: bool = True, log=print) -> Path:
    """The `bin/` folder of the Python environment the stub embeds (module docstring), checked:
    DSV3_TRITON_PYTHON (an environment's folder or its python), else this interpreter's own when
    its numpy is 1.x or `numpy1` is off (a full Triton install's stub, built for its own numpy),
    else the cached environment with numpy<2, made on first use."""
    import numpy

    given = os.environ.get(ENV_PYTHON)
    if given:
        path = Path(given).expanduser()
        bindir = path.parent if path.is_file() else path / "bin"
    elif not numpy1 or int(numpy.__version__.split(".")[0]) < 2:
        bindir = Path(sys.executable).parent
    else:
        env_path = _default_env_path()
        if not _python_of(env_path).is_file():
            _make_env(env_path, log)
        try:
            _numpy_major(_python_of(env_path), env)
        except ExportError as e:  # a cached environment made by an older dsv3-export, or broken since
            log(f"rebuilding the python backend's environment {env_path}: {e}")
            shutil.rmtree(env_path)
            _make_env(env_path, log)
        bindir = env_path / "bin"
    python = bindir / "python3"
    try:
        major = _numpy_major(python, env)
    except ExportError as e:
        where = f"{ENV_PYTHON}={given}" if given else f"the environment in {bindir.parent}"
        raise ExportError(f"{e} ({where}; set {ENV_PYTHON} to a Python environment with this project and "
                          f"{STUB_NUMPY})") from None
    if major >= 2 and numpy1:
        raise ExportError(f"{python}: its numpy is 2.x; the pytriton wheel's python stub needs {STUB_NUMPY}")
    return bindir


def server_environment(inst: Installation, python_bin: Path | None = None) -> dict[str, str]:
    """The server's environment: its libraries, the stub's Python first on PATH, our source tree."""
    env = dict(os.environ)
    libs = [str(p) for p in inst.libs]
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):  # the stub then loads this interpreter's libpython
        libs.insert(0, str(sysconfig.get_config_var("LIBDIR")))
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    if python_bin is not None:
        env["PATH"] = os.pathsep.join([str(python_bin), env.get("PATH", "")])
    root = _source_root()
    if root is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def command(inst: Installation, repo: Path, backends: Path, host: str, http_port: int, grpc_port: int,
            metrics_port: int | None, http_host: str | None = None) -> list[str]:
    cmd = [str(inst.binary), f"--model-repository={repo}", f"--backend-directory={backends}",
           f"--http-address={host if http_host is None else http_host}", f"--http-port={http_port}",
           f"--grpc-address={host}",
           f"--grpc-port={grpc_port}", f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
           "--disable-auto-complete-config"]  # the configs are complete and checked: run them as written
    if metrics_port:
        cmd += ["--allow-metrics=true", f"--metrics-address={host}", f"--metrics-port={metrics_port}"]
    else:  # nothing listens beyond the two ports asked for
        cmd += ["--allow-metrics=false", "--allow-gpu-metrics=false", "--allow-cpu-metrics=false"]
    return cmd


# ---- running it -----------------------------------------------------------------------------------
class TritonServer:
    """One tritonserver process over a repository: `start`, `wait_ready`, `stop`. It runs in a
    process group of its own (the python stubs are its children), so that stopping it can make sure
    nothing of it is left, and so that a terminal's Ctrl-C reaches it only through us."""

    def __init__(self, repo: str | Path, *, http_port: int, grpc_port: int, host: str = "127.0.0.1",
                 metrics_port: int | None = None, log=print, http_host: str | None = None):
        self.repo = Path(repo).resolve()
        self.host, self.http_port, self.grpc_port, self.metrics_port = host, http_port, grpc_port, metrics_port
        self.http_host = host if http_host is None else http_host  # the guard's upstream: loopback
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.workdir: Path | None = None
        self.stopping = False

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.http_host, self.http_host)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.http_port}"

    def start(self) -> None:
        if not any(self.repo.glob("*/config.pbtxt")):
            raise ExportError(f"{self.repo}: not a Triton model repository (no <model>/config.pbtxt)")
        inst = find_tritonserver()
        self.workdir = Path(tempfile.mkdtemp(prefix="dsv3-triton-"))
        backends = backend_directory(inst, self.workdir)
        needed = backends_needed(self.repo)
        for model, backend in needed.items():
            if not (backends / backend).is_dir():
                raise ExportError(f"{self.repo}: model {model} needs Triton's {backend} backend, which {inst.binary} "
                                  "does not have (the pytriton wheel carries the python backend only); run this "
                                  "repository in NVIDIA's Triton container (docs/triton.md)")
        python_bin = None
        if "python" in needed.values():
            python_bin = stub_environment(server_environment(inst), numpy1=inst.stubs is not None, log=self.log)
        cmd = command(inst, self.repo, backends, self.host, self.http_port, self.grpc_port, self.metrics_port,
                      http_host=self.http_host)
        self.proc = subprocess.Popen(cmd, env=server_environment(inst, python_bin), start_new_session=True,
                                     preexec_fn=_parent_death_signal())  # noqa: PLW1509  (see there)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> bool:
        """Poll /v2/health/ready (at most timeout / pause times, and for at most timeout seconds);
        False when a stop was asked for meanwhile, ExportError when the server exits or does not get
        ready in time."""
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / READY_PAUSE_S) + 1):
            if time.monotonic() > deadline:
                break
            if self.stopping:
                return False
            if self.proc.poll() is not None:
                raise ExportError(f"tritonserver exited with {self.proc.returncode} while loading {self.repo} "
                                  "(its log is above)")
            if self.ready():
                return True
            time.sleep(READY_PAUSE_S)
        raise ExportError(f"tritonserver was not ready within {timeout:.0f} s ({self.url}/v2/health/ready)")

    def send_signal(self, sig: int) -> None:
        """Forward a signal to the server (Triton stops on SIGINT and SIGTERM, letting in-flight
        requests finish for up to EXIT_TIMEOUT_S)."""
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_GRACE_S) -> int | None:
        """Signal, wait (bounded), kill if still running; the exit code (None when killed)."""
        if self.proc is None:
            self.close()
            return None
        self.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
        self.close()
        return rc

    def close(self) -> None:
        """Kill whatever is left of the server's process group (by its id) and remove our links."""
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            _end_group(self.proc.pid)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def _parent_death_signal():
    """A function for the child between fork and exec that asks Linux to SIGTERM it when its parent
    goes (strictly: when the thread that started it ends; start the server from a thread that lives
    as long as it should), so that a killed `dsv3-export triton --serve` leaves no server running in
    its own session. Resolved here, before the fork: the child then only makes one C call (no
    import, no lock another thread could hold). None where prctl is not available."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG = 1


def _end_group(pgid: int, grace: float = 5.0) -> None:
    """Members of the server's process group still alive after it exited (a stub that did not
    notice): SIGTERM, a bounded wait, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _executions(url: str) -> int | None:
    """The executions tritonserver has counted over all its models (None when it does not answer)."""
    try:
        with urllib.request.urlopen(f"{url}/v2/models/stats", timeout=2) as r:
            stats = json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None
    return sum(int(m.get("execution_count", 0)) for m in stats.get("model_stats", []))


def wait_quiet(url: str, quiet: float = QUIET_S, limit: float = DRAIN_S) -> bool:
    """Wait until tritonserver's execution count has not moved for `quiet` seconds (True), or
    `limit` seconds have passed or it stopped answering (False)."""
    deadline = time.monotonic() + limit
    last, since = _executions(url), time.monotonic()
    for _ in range(int(limit / 0.1) + 1):
        if last is None or time.monotonic() > deadline:
            return False
        if time.monotonic() - since >= quiet:
            return True
        time.sleep(0.1)
        now = _executions(url)
        if now != last:
            last, since = now, time.monotonic()
    return False


def serve(repo: str | Path, http_port: int = 8000, grpc_port: int = 8001, host: str = "127.0.0.1", *,
          metrics_port: int | None = None, client_timeout: float = CLIENT_TIMEOUT_S, log=print) -> int:
    """Run tritonserver over `repo` until SIGINT / SIGTERM, in the foreground. Clients reach its
    HTTP API through the guard (deploy/guard.py) on host:http_port; tritonserver's own HTTP port is
    a private loopback one. On the signal the guard ends its requests (GRACEFUL_S), the text
    model's scheduler goes quiet, and then tritonserver gets the signal; a second signal goes to it
    at once. Returns its exit code (0 for a clean stop on a signal)."""
    server = TritonServer(repo, http_port=_free_loopback_port(), grpc_port=grpc_port, host=host,
                          metrics_port=metrics_port, log=log, http_host="127.0.0.1")
    guard = GuardServer(server.url, host, http_port, client_timeout)
    asked: list[tuple[float, int]] = []

    def on_signal(signum, _frame):
        asked.append((time.monotonic(), signum))
        guard.begin_stop()
        if len(asked) > 1 or not guard.thread.is_alive():  # impatient, or nothing served yet
            server.send_signal(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        if server.wait_ready():
            guard.start()
            log(f"tritonserver ready: HTTP http://{host}:{http_port} (POST /v2/models/dsv3/generate, generate_stream; "
                f"through the guard), gRPC {host}:{grpc_port}; Ctrl-C or SIGTERM stops it")
        while (rc := server.proc.poll()) is None:
            if asked and not server.stopping and not guard.thread.is_alive():
                wait_quiet(server.url)
                server.send_signal(asked[0][1])
            if asked and time.monotonic() - asked[0][0] > STOP_GRACE_S:
                break  # close() kills it
            time.sleep(0.2)
        if rc is None:
            log(f"tritonserver did not stop within {STOP_GRACE_S} s of the signal; killed")
            return 1
        return 0 if asked and rc in (0, -signal.SIGINT, -signal.SIGTERM) else rc
    finally:
        guard.stop()
        server.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
