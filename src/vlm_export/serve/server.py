"""Start and stop a real local ``tritonserver``.

The binary is ``tritonserver`` on PATH (NVIDIA's container) or, failing that, the one shipped in
the ``nvidia-pytriton`` wheel. That one needs what the wheel does not arrange by itself (see
``NOTES.md``): a backend folder where the python-backend stub for *this* Python sits beside
``libtriton_python.so``; ``LD_LIBRARY_PATH`` with the wheel's bundled libraries and the Python
shared library; and a stub that imports from *this* environment (numpy<2, vlm_export) rather than
the base interpreter's, which we get by putting ``sys.prefix/bin`` first on the server's PATH.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vlm_export.cache import cache_root
from vlm_export.errors import ServeError
from vlm_export.signals import raising
from vlm_export.client.client import connect_host

PYTRITON_PIN = "nvidia-pytriton==0.7.0"
_LOG_TAIL_LINES = 25
_KILL_GRACE_S = 10.0  # beyond Triton's own exit timeout, before SIGKILL
_METRICS_WAIT_S = 5.0
_SETTLE_S = 0.3  # after the metrics service started: Triton exits within ms if its port is taken
# Our own server is local: an http_proxy in the environment must not route the health check.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# Error lines Triton prints on every start on a machine without a GPU.
_HARMLESS = ("CudaDriverHelper", "NVML", "DCGM", "pinned memory")

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the binary


class TritonBinary:
    """Where the server binary is and what it needs to run.

    ``backend_dir`` is None for a system install: its own default (/opt/tritonserver/backends)
    is right there, and its libraries are already on the loader path.
    """

    def __init__(self, path: Path, backend_dir: Path | None = None, lib_dirs: tuple[Path, ...] = ()):
        self.path = Path(path)
        self.backend_dir = backend_dir
        self.lib_dirs = tuple(lib_dirs)

    @property
    def bundled(self) -> bool:
        """True for the nvidia-pytriton binary, whose stub was built for this very Python."""
        return self.backend_dir is not None

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment for the server process."""
        env = dict(os.environ if base is None else base)
        if self.lib_dirs:
            env["LD_LIBRARY_PATH"] = _prepend(env.get("LD_LIBRARY_PATH"), *self.lib_dirs)
        if self.bundled:
            # The stub embeds Python, which finds its prefix by looking up `python3` on PATH and
            # honours a pyvenv.cfg beside it. With this interpreter's bin/ first, python models
            # import from our environment (numpy<2, vlm_export) even when the venv is not
            # activated and the config has no EXECUTION_ENV_PATH. Not done for a system server:
            # its stub may be built for another Python version.
            env["PATH"] = _prepend(env.get("PATH"), Path(sys.prefix) / "bin")
        return env

    def __repr__(self) -> str:
        return f"TritonBinary({str(self.path)!r}, backend_dir={self.backend_dir!r})"


def _prepend(current: str | None, *dirs) -> str:
    parts = [str(d) for d in dirs] + ([current] if current else [])
    return os.pathsep.join(parts)


def _pytriton_server_dir() -> Path | None:
    try:
        import pytriton  # noqa: PLC0415 - optional dependency, only needed to serve
    except ImportError:
        return None
    d = Path(pytriton.__file__).resolve().parent / "tritonserver"
    return d if (d / "bin" / "tritonserver").is_file() else None


def prepare_backend_dir(server_dir: Path, cache_dir: Path | None = None) -> Path:
    """A backend folder holding the wheel's python backend plus the stub for this Python.

    The wheel keeps one stub per Python version in ``python_backend_stubs/3.X/``; the backend
    looks for ``triton_python_backend_stub`` beside ``libtriton_python.so``, so we assemble that
    folder once per (wheel, Python) in a cache. It is built in a temporary folder and renamed, so
    an interrupted copy never looks complete.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server_dir / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServeError(
            f"nvidia-pytriton has no python-backend stub for Python {version} ({stub}); "
            f"use a Python it ships stubs for, or run tritonserver from NVIDIA's container"
        )
    # The key changes when the wheel is reinstalled or upgraded, so a stale copy is never used.
    lib = server_dir / "backends" / "python" / "libtriton_python.so"
    key = f"py{version}-{lib.stat().st_size}-{int(lib.stat().st_mtime)}"
    root = (cache_dir or cache_root()) / "triton-backends" / key
    if (root / "python" / "triton_python_backend_stub").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root.parent))
    try:
        shutil.copytree(server_dir / "backends" / "python", tmp / "python",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
        os.chmod(tmp / "python" / "triton_python_backend_stub", 0o755)
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first: use its copy
            if not (root / "python" / "triton_python_backend_stub").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def find_tritonserver(cache_dir: Path | None = None) -> TritonBinary:
    """``tritonserver`` on PATH, else the binary shipped in nvidia-pytriton, else ServeError."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonBinary(Path(on_path))
    server_dir = _pytriton_server_dir()
    if server_dir is None:
        raise ServeError(
            f"no tritonserver found: none on PATH and nvidia-pytriton is not installed; "
            f"run `pip install {PYTRITON_PIN}`"
        )
    libs = server_dir.parent.parent / "nvidia_pytriton.libs"  # auditwheel's folder beside the package
    # The stub links libpython dynamically; this folder holds it when Python is built shared.
    pylib = sysconfig.get_config_var("LIBDIR")
    lib_dirs = tuple(Path(d) for d in (libs, pylib) if d and Path(d).is_dir())
    return TritonBinary(server_dir / "bin" / "tritonserver", prepare_backend_dir(server_dir, cache_dir), lib_dirs)


# --------------------------------------------------------------------------- python models


def execution_env_path() -> str:
    """The environment the python-backend stub should run in: this interpreter's (venv) root.

    The stub ignores PYTHONPATH and, left alone, imports from the base interpreter's
    site-packages (where numpy may be 2.x, which corrupts tensors, and our package is absent).
    """
    return sys.prefix


def execution_env_parameter(path: str | None = None) -> str:
    """The config.pbtxt ``parameters`` entry that runs a python model in ``path`` (default: ours).

    The backend then starts the stub as ``bash -c 'source PATH/bin/activate && exec ...'``, so
    the folder needs a ``bin/activate`` script, which every venv and conda env has.
    """
    path = path or execution_env_path()
    if not (Path(path) / "bin" / "activate").is_file():
        raise ServeError(
            f"{path} has no bin/activate, so the Triton python backend cannot use it as "
            f"EXECUTION_ENV_PATH; serve from a virtual environment (python -m venv)"
        )
    return 'parameters: { key: "EXECUTION_ENV_PATH", value: { string_value: "%s" } }' % path


# --------------------------------------------------------------------------- python-backend stubs
#
# Each python model instance runs in a `triton_python_backend_stub` process, a child of
# tritonserver. When one dies (the kernel's OOM killer, a segfault in an extension), Triton 2.51's
# python backend never restarts it, answers every later request with "Stub process '...' is not
# healthy", leaves the requests that stub was streaming hanging forever, and keeps answering
# /v2/health/ready with 200 (triton-inference-server/server #7862, #8604; NOTES.md has the
# measurements). So TritonServer watches its stubs itself; see TritonServer._supervise.

_STUB_NAME = "triton_python_backend_stub"
_STUB_COMM = _STUB_NAME[:15]  # the kernel keeps the first 15 bytes of a process name
_SHM_PREFIX = "triton_python_backend_shm_region_"
_SHM_DIR = Path("/dev/shm")
# The python backend makes an (empty, unless an archived EXECUTION_ENV_PATH is unpacked) folder
# from this fixed template when it initializes, and removes it only when the server exits in order.
_PYTHON_ENV_GLOB = "/tmp/python_env_*"
_POLL_S = 0.5          # how often the supervisor looks at the server and its stubs
_RESCAN_S = 5.0        # how often it lists the server's children anew (new stubs after a load)
_CONFIRM_S = 0.3       # a stub must still be dead this much later (Triton reaps stubs it stops itself)
_MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class StubProcess:
    """One python-backend stub: ``instance`` is Triton's instance name (``vlm_0_0``)."""

    pid: int
    start_time: int  # in clock ticks since boot (/proc/PID/stat field 22): tells a reused pid apart
    instance: str
    model: str
    shm_region: str  # the shared-memory region it shares with the server, in /dev/shm


@dataclass(frozen=True)
class _ProcStat:
    state: str
    ppid: int
    start_time: int
    exit_status: int  # wait() status of a zombie (field 52, Linux >= 3.5), else 0


def _proc_stat(pid: int) -> _ProcStat | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()  # the name may hold spaces and parentheses
    try:
        # fields[0] is field 3 of proc(5): state, ppid (4), starttime (22), exit_code (52)
        return _ProcStat(fields[0].decode(), int(fields[1]), int(fields[19]),
                         int(fields[49]) if len(fields) > 49 else 0)
    except (IndexError, ValueError):
        return None


def _children(pid: int) -> list[tuple[int, _ProcStat]]:
    try:
        names = os.listdir("/proc")
    except OSError:  # no procfs: the supervisor then watches the server process only
        return []
    found = []
    for name in names:
        if name.isdigit():
            stat = _proc_stat(int(name))
            if stat is not None and stat.ppid == pid:
                found.append((int(name), stat))
    return found


def _zombie_stubs(pid: int) -> list[tuple[int, _ProcStat]]:
    """The python-backend stubs among ``pid``'s children that died and were not reaped (zombies keep
    their name): a dead stub, since Triton reaps at once only the stubs it stops itself."""
    found = []
    for child, stat in _children(pid):
        if stat.state == "Z":
            try:
                comm = Path(f"/proc/{child}/comm").read_text().strip()
            except OSError:
                continue
            if comm == _STUB_COMM:
                found.append((child, stat))
    return found


def _tritonservers(http_port: int) -> list[int]:
    """The tritonserver processes on this machine listening (by their arguments) on ``http_port``;
    one without ``--http-port`` listens on Triton's default, 8000."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if Path(f"/proc/{name}/comm").read_text().strip() != "tritonserver":
                continue
            args = [a.decode(errors="replace") for a in Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        given = [a.split("=", 1)[1] for a in args if a.startswith("--http-port=")]
        given += [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--http-port"]
        if (given[-1] if given else "8000") == str(http_port):
            found.append(int(name))
    return found


def liveness_failure(http_port: int = 8000, host: str = "127.0.0.1", timeout: float = 4.0) -> str | None:
    """Why the tritonserver on this machine serving HTTP on ``http_port`` is not live, or None.

    Triton's own ``/v2/health/live`` (and ``ready``) stay 200 when a python-backend stub has died,
    while the model fails every request (see the comment above ``StubProcess``); so this looks at the
    server's stubs too. It is the Kubernetes liveness probe of the ``triton`` container (``vlm-export
    health``, deploy/kubernetes.py), where no supervisor runs: failing, the kubelet restarts the
    container, as ``TritonServer``'s supervisor restarts a local server."""
    if not Path("/proc").is_dir():
        return "no /proc here: cannot see the tritonserver process"
    servers = _tritonservers(http_port)
    if not servers:
        return f"no tritonserver process serving HTTP on port {http_port} is running"
    dead = [(server, child, stat) for server in servers for child, stat in _zombie_stubs(server)]
    if dead:
        time.sleep(_CONFIRM_S)  # a stub Triton stops on purpose (an unload) is reaped at once
        dead = [(server, child, stat) for server, child, stat in dead
                if (now := _proc_stat(child)) is not None and now.state == "Z" and now.start_time == stat.start_time]
    if dead:
        return "; ".join(f"a python-backend stub (pid {child}) of tritonserver (pid {server}) "
                         f"{_describe_status(stat.exit_status)}" for server, child, stat in dead) + \
            " (Triton never restarts a stub: the model fails every request until the server restarts)"
    url = f"http://{connect_host(host)}:{http_port}/v2/health/live"
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=timeout) as response:
            if response.status == 200:
                return None
            return f"{url} answered {response.status}"
    except urllib.error.HTTPError as e:
        return f"{url} answered {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return f"{url} did not answer: {getattr(e, 'reason', e)}"


def _stub_from_cmdline(pid: int, stat: _ProcStat) -> StubProcess | None:
    """The stub ``pid`` is, from its arguments, or None for anything else.

    The backend starts it as ``STUB MODEL_PY SHM_REGION SHM_SIZE SHM_GROWTH PARENT_PID LIB_DIR
    IPC_HANDLE INSTANCE_NAME ...`` (python_backend src/stub_launcher.cc), through ``bash -c
    'exec ...'``, so once running the stub's own arguments are these.
    """
    try:
        args = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except OSError:
        return None
    if not args or Path(args[0]).name != _STUB_NAME or len(args) < 9:
        return None  # not a stub, a zombie (empty cmdline) or the shell before its exec
    model_py = Path(args[1])
    model = model_py.parent.parent.name if model_py.name == "model.py" else model_py.name
    return StubProcess(pid, stat.start_time, args[8], model, args[2])


def _describe_status(status: int) -> str:
    """A zombie's wait() status in words."""
    sig = status & 0x7F
    if sig:
        try:
            return f"killed by signal {sig} ({signal.Signals(sig).name})"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exited with code {(status >> 8) & 0xFF}"


def _describe_returncode(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


# --------------------------------------------------------------------------- the server


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now. Another process may take it before Triton binds: see start()."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


#: where a system tritonserver looks for its backends unless told otherwise
SYSTEM_BACKEND_DIR = Path("/opt/tritonserver/backends")
#: Triton platforms -> the backend that runs them (an ensemble is Triton's own)
PLATFORM_BACKENDS = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt", "pytorch_libtorch": "pytorch",
                     "tensorflow_savedmodel": "tensorflow", "tensorflow_graphdef": "tensorflow"}
_BACKEND_FIELD = re.compile(r'^\s*(backend|platform)\s*:\s*"([^"]*)"', re.MULTILINE)


def check_backends(repository: Path, backend_dir: Path, binary: Path) -> None:
    """ServeError, before starting anything, when a model of ``repository`` needs a backend that
    ``backend_dir`` lacks: Triton would load every other model first and only then give up (~80 s of
    python models on a small machine). Skipped where the folder cannot be listed (another layout), and
    for a model that carries its own backend library (``libtriton_NAME.so`` in its folder)."""
    try:
        present = {p.name for p in backend_dir.iterdir() if p.is_dir()}
    except OSError:
        return
    needs: dict[str, list[str]] = {}
    for config in sorted(Path(repository).glob("*/config.pbtxt")):
        try:
            text = config.read_text()
        except (OSError, UnicodeDecodeError):
            continue  # Triton reports an unreadable config itself
        fields: dict[str, str] = {}
        for key, value in _BACKEND_FIELD.findall(text):
            fields.setdefault(key, value)  # the first of each, as Triton's parser would refuse a second
        backend = fields.get("backend") or PLATFORM_BACKENDS.get(fields.get("platform", ""))
        own = list(config.parent.glob(f"**/libtriton_{backend}.so")) if backend else []
        if backend and backend not in present and not own:
            needs.setdefault(backend, []).append(config.parent.name)
    if needs:
        backend, models = next(iter(needs.items()))
        raise ServeError(
            f"model(s) {', '.join(models)} of {repository} need Triton's {backend} backend, which {binary} does not have "
            f"(its backends, in {backend_dir}: {', '.join(sorted(present)) or 'none'}); serve this repository with a "
            f"Triton that has it (NGC's tritonserver image, or deploy/Dockerfile), or render the build for the python "
            "target: vlm-export repository BUILD --target python --out DIR")


#: how long models may take to load: the wait ends as soon as Triton is ready, and a server that exits is
#: reported at once; the demo's python models took ~110 s on a 2-core machine under load (120 s was too short)
STARTUP_TIMEOUT_S = 600.0


class TritonServer:
    """A tritonserver process serving one model repository; use as a context manager.

    ``http_url`` and ``grpc_url`` are ``host:port`` (no scheme), the form ``tritonclient.http``
    and ``tritonclient.grpc`` take. Ports left as None are chosen free at start.

    On stop, Triton gets ``stop_timeout`` seconds to finish in-flight requests; it also waits
    that long for open HTTP keep-alive connections, so close clients first for a fast stop.
    After that and a grace period the whole process group is killed.

    With ``supervise`` (the default) a thread watches the server and its python-backend stub
    processes. When a stub dies, or tritonserver itself exits, it kills what is left of the
    server (which ends the requests that were in flight with a connection error, and makes
    health checks fail) and starts a new one on the same ports; ``restarts`` counts these, and
    every event is reported to ``on_event`` (default: this module's logger), kept in
    ``events`` and appended to the log file. A restart that fails to start is retried, with a
    growing pause; past ``max_restarts`` restarts within ``restart_window`` seconds it gives up:
    the server is left stopped, ``failure`` says why and ``wait()`` returns.
    """

    def __init__(
        self,
        model_repository: str | os.PathLike,
        *,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        log_file: str | os.PathLike | None = None,
        startup_timeout: float = STARTUP_TIMEOUT_S,
        stop_timeout: float = 10.0,
        extra_args: tuple[str, ...] | list[str] = (),
        binary: TritonBinary | None = None,
        supervise: bool = True,
        max_restarts: int = 5,
        restart_window: float = 600.0,
        on_event: Callable[[str], object] | None = None,
    ):
        self.model_repository = Path(model_repository).resolve()
        self.host = host
        self._ports_fixed = (http_port, grpc_port, metrics_port)
        self.http_port, self.grpc_port, self.metrics_port = self._ports_fixed
        self.log_file = Path(log_file) if log_file else None
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.extra_args = list(extra_args)
        self.binary = binary
        self.process: subprocess.Popen | None = None
        self._log_offset = 0
        self._cleaned_up = False
        # the supervisor
        self.supervise = supervise
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.on_event = on_event
        self.restarts = 0  # times the supervisor started a new tritonserver
        self.events: list[str] = []  # what the supervisor did, one line per event
        self.failure: ServeError | None = None  # set when the supervisor gave up
        self.stubs: dict[int, StubProcess] = {}  # the stubs of the current server, by pid
        self._supervisor: threading.Thread | None = None
        self._stopping = threading.Event()
        self._done = threading.Event()  # stopped for good: by stop(), or the supervisor gave up
        self._lock = threading.Lock()  # a restart does not spawn a server once stop() has begun
        self._ready = False  # the current process finished starting
        self._env_dirs_before: set[str] = set()  # python_env folders that existed before the spawn
        self._env_dir: str | None = None  # the current process's python_env folder, once identified

    # ------------------------------------------------------------------ addresses
    @property
    def http_url(self) -> str:
        return f"{connect_host(self.host)}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{connect_host(self.host)}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{connect_host(self.host)}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def command(self) -> list[str]:
        assert self.binary is not None
        cmd = [
            str(self.binary.path),
            "--model-repository", str(self.model_repository),
            "--http-address", self.host, "--http-port", str(self.http_port),
            "--grpc-address", self.host, "--grpc-port", str(self.grpc_port),
            "--metrics-address", self.host, "--metrics-port", str(self.metrics_port),
            "--exit-timeout-secs", str(max(1, round(self.stop_timeout))),
        ]
        if self.binary.backend_dir is not None:
            cmd += ["--backend-directory", str(self.binary.backend_dir)]
        return cmd + self.extra_args

    def _backend_dir(self) -> Path:
        """Where this server will look for backends: ours, a --backend-directory passed, or Triton's default."""
        given = None
        for i, arg in enumerate(self.extra_args):
            if arg == "--backend-directory" and i + 1 < len(self.extra_args):
                given = self.extra_args[i + 1]
            elif arg.startswith("--backend-directory="):
                given = arg.split("=", 1)[1]
        if given is not None:
            return Path(given)
        return self.binary.backend_dir if self.binary.backend_dir is not None else SYSTEM_BACKEND_DIR

    # ------------------------------------------------------------------ life cycle
    def start(self) -> "TritonServer":
        if self.process is not None:
            raise ServeError("this TritonServer was already started; make a new one")
        if not self.model_repository.is_dir():
            raise ServeError(f"model repository {self.model_repository} is not a folder")
        if self.binary is None:
            self.binary = find_tritonserver()
        check_backends(self.model_repository, self._backend_dir(), self.binary.path)
        if self.log_file is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_file = Path(name)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        # Free ports are chosen by probing, so another process can take one before Triton binds
        # it; then we retry with fresh ports. A port the caller fixed is not retried.
        for attempt in range(3):
            self._pick_ports()
            self._spawn()
            try:
                self._wait_ready()
                if self.supervise:
                    self.stubs = self._scan_stubs()
                    self._supervisor = threading.Thread(target=self._supervise, daemon=True,
                                                        name=f"triton-supervisor-{self.grpc_port}")
                    self._supervisor.start()
                return self
            except BaseException as err:  # Ctrl-C while starting too: leave no server behind
                self._terminate()
                if not isinstance(err, ServeError):
                    raise
                busy = self._busy_port()
                if busy is None:
                    raise
                if busy in self._ports_fixed:
                    raise ServeError(
                        f"tritonserver cannot listen on {self.host}:{busy}: the port is already in use; "
                        f"choose another port or leave it out to get a free one"
                    ) from err
                if attempt == 2:
                    raise
                self.process = None
        raise AssertionError("unreachable")

    def _busy_port(self) -> int | None:
        """The port Triton found taken, from this run's part of the log, or None."""
        m = re.search(r"Socket '.*:(\d+)' already in use", self._this_run_log())
        return int(m.group(1)) if m else None

    def _pick_ports(self) -> None:
        taken = {p for p in self._ports_fixed if p is not None}
        ports = []
        for p in self._ports_fixed:
            if p is None:
                p = free_port(self.host or "0.0.0.0")
                while p in taken:
                    p = free_port(self.host or "0.0.0.0")
            taken.add(p)
            ports.append(p)
        self.http_port, self.grpc_port, self.metrics_port = ports

    def _spawn(self) -> None:
        self._env_dirs_before, self._env_dir = set(glob.glob(_PYTHON_ENV_GLOB)), None
        with open(self.log_file, "ab") as log:
            self._log_offset = log.tell()  # the log may hold earlier runs: read from here
            log.write(f"$ {' '.join(self.command())}\n".encode())
            log.flush()
            # A session of its own: Ctrl-C in the terminal reaches us, not the server, so we can
            # stop it in order; and its python-backend stubs share its process group, so a
            # SIGKILL fallback can reach them too.
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.binary.env(), start_new_session=True,
            )
            self._cleaned_up = False
            self._ready = False

    def metric(self, name: str) -> float | None:
        """The sum over labels of one metric from Triton's Prometheus endpoint (the ``vlm`` model's
        ``vlm_*`` families among them), or None when the server does not report it."""
        with _NO_PROXY.open(self.metrics_url, timeout=10) as resp:
            text = resp.read().decode()
        values = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)]
        return sum(values) if values else None

    def is_ready(self, timeout: float = 2.0) -> bool:
        url = f"http://{self.http_url}/v2/health/ready"
        try:
            with _NO_PROXY.open(url, timeout=timeout) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while not self.is_ready():
            self._check_alive()
            self._check_not_stopping()
            if time.monotonic() > deadline:
                raise self.failed(f"tritonserver was not ready after {self.startup_timeout:.0f} s")
            time.sleep(0.2)
        # Triton reports ready before it starts the metrics service, its last step, and exits
        # if that port is taken: wait for that step, then a moment for its outcome.
        deadline = time.monotonic() + _METRICS_WAIT_S
        while "Started Metrics Service" not in self._this_run_log() and time.monotonic() < deadline:
            self._check_alive()
            self._check_not_stopping()
            time.sleep(0.05)
        time.sleep(_SETTLE_S)
        self._check_alive()
        self._ready = True
        self._find_env_dir()

    def _find_env_dir(self) -> None:
        """This server's python_env folder: the one folder new since the spawn, once its python
        backend has started (its log says so), or when no other tritonserver still running started
        since (before that, its backend may not have made one yet). Otherwise left alone."""
        if self._env_dir is not None:
            return
        new = set(glob.glob(_PYTHON_ENV_GLOB)) - self._env_dirs_before
        if len(new) == 1 and ("python_be.cc" in self._this_run_log() or not self._other_servers_since()):
            self._env_dir = new.pop()

    def _other_servers_since(self) -> bool:
        """Whether a tritonserver other than ours, started after ours, is running (it may have made
        a python_env folder meanwhile)."""
        ours = _proc_stat(self.process.pid)
        if ours is None:
            return True
        try:
            names = os.listdir("/proc")
        except OSError:
            return True
        for name in names:
            if not name.isdigit() or int(name) == self.process.pid:
                continue
            stat = _proc_stat(int(name))
            if stat is None or stat.state == "Z" or stat.start_time < ours.start_time:
                continue
            try:
                if Path(f"/proc/{name}/comm").read_text().strip() == "tritonserver":
                    return True
            except OSError:
                continue
        return False

    def _check_not_stopping(self) -> None:
        if self._stopping.is_set():  # stop() was called while the supervisor restarts the server
            raise ServeError("tritonserver was stopped while starting")

    def _check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise self.failed(f"tritonserver exited with code {code} while starting")

    def _this_run_log(self) -> str:
        try:
            with open(self.log_file, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except (OSError, TypeError):
            return ""

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        return "\n".join(self._this_run_log().splitlines()[-lines:])

    def failed(self, what: str) -> ServeError:
        """``what`` happened, with Triton's first error line on the message's first line (the CLI prints
        that line alone), the others after it."""
        errors = self.log_errors().strip().splitlines() or ["no error line in its log"]
        return ServeError("\n".join([f"{what}: {errors[0]} (log: {self.log_file})", *errors[1:]]))

    def log_errors(self) -> str:
        """Triton's error lines (E..., ``error: ...``, models UNAVAILABLE), else the log's tail.

        The tail alone is mostly the options table printed on exit, so pick out what matters.
        """
        picked = []
        for line in self._this_run_log().splitlines():
            is_error = re.match(r"E\d{4} ", line) or line.startswith("error:") or "UNAVAILABLE" in line
            if is_error and not any(h in line for h in _HARMLESS):
                line = " ".join(line.strip(" |").split())  # table rows are padded with spaces
                picked.append(line if len(line) <= 400 else line[:400] + " ...")
        return "\n".join(picked) if picked else self.log_tail()

    def stop(self) -> int | None:
        """SIGTERM (Triton drains requests and unloads models), SIGKILL if it hangs.

        Returns the exit code; safe to call twice.
        """
        if self.process is None:
            return None
        with self._lock:
            self._stopping.set()
        thread = self._supervisor
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30.0)  # it notices within a poll interval, or an is_ready() call
        if self._ready:
            self._terminate()
        else:  # a restart still loading its models: no request to drain, and loading would hold it up
            self._kill_group()
        self._done.set()
        return self.process.returncode

    def _terminate(self) -> None:
        proc = self.process
        if self._cleaned_up:  # its group id may belong to someone else by now
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout + _KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
        self._kill_group()

    def _kill_group(self) -> None:
        """SIGKILL whatever is left of the server's process group, and free its shared memory."""
        proc = self.process
        if self._cleaned_up:
            return
        # Kill whatever is left of the group (a hung server, or stubs it left behind). The group
        # id is the server's pid, and it is ours: we started it with a session of its own.
        if proc.poll() is None:  # what it would leave behind, first (a restart may be killed while loading)
            self.stubs = {**self._scan_stubs(), **self.stubs}
            self._find_env_dir()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        self._cleaned_up = True
        # A server that exits in order removes the stubs' shared-memory regions; a killed one
        # leaves them in /dev/shm (1 MB or more each). Their names hold a UUID: only this server's.
        for stub in self.stubs.values():
            if stub.shm_region.startswith(_SHM_PREFIX) and "/" not in stub.shm_region:
                try:
                    (_SHM_DIR / stub.shm_region).unlink()
                except OSError:
                    pass
        self.stubs = {}
        if self._env_dir is not None:  # gone already after an orderly exit; rmdir leaves a non-empty one
            try:
                os.rmdir(self._env_dir)
            except OSError:
                pass
            self._env_dir = None

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the server is down for good; True if it is, False after ``timeout`` seconds.

        Down for good: stopped, or the supervisor gave up (``failure`` says why), or, without a
        supervisor, the process exited.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._done.is_set():
                return True
            thread = self._supervisor
            supervised = thread is not None and thread.is_alive()
            if not supervised and self.process is not None and self.process.poll() is not None:
                return True
            left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if left <= 0:
                return False
            self._done.wait(left)

    # ------------------------------------------------------------------ the supervisor
    def _event(self, message: str) -> None:
        line = f"supervisor: {message}"
        self.events.append(line)
        try:
            with open(self.log_file, "ab") as f:
                f.write(f"[vlm-export {time.strftime('%Y-%m-%d %H:%M:%S')}] {line}\n".encode())
        except OSError:
            pass
        try:
            (self.on_event or log.warning)(line)
        except Exception:  # noqa: BLE001 - a broken callback must not stop the supervisor
            log.exception("on_event failed")

    def _scan_stubs(self) -> dict[int, StubProcess]:
        """The python-backend stubs running under the current server, by pid."""
        stubs = {}
        for pid, stat in _children(self.process.pid):
            if stat.state != "Z":
                stub = _stub_from_cmdline(pid, stat)
                if stub is not None:
                    stubs[pid] = stub
        return stubs

    def _dead_stubs(self) -> list[tuple[StubProcess, int]]:
        """(stub, wait status) for each dead stub of the server.

        A stub that dies stays a zombie: Triton only reaps the stubs it stops itself, and at once
        (those, after an unload, are simply gone).
        """
        server = self.process.pid
        dead, stubs = [], dict(self.stubs)  # a new dict: other threads may be reading self.stubs
        for pid, stub in self.stubs.items():
            stat = _proc_stat(pid)
            if stat is None or stat.start_time != stub.start_time or stat.ppid != server:
                del stubs[pid]  # reaped by Triton: unloaded on purpose
            elif stat.state == "Z":
                dead.append((stub, stat.exit_status))
        self.stubs = stubs
        return dead

    def _find_failure(self, rescan: bool) -> str | None:
        """Why the server needs a restart now, or None while it is healthy."""
        code = self.process.poll()
        if code is not None:
            return f"tritonserver (pid {self.process.pid}) {_describe_returncode(code)}"
        if rescan:
            stubs = {**self._scan_stubs(), **self.stubs}
            for pid, stat in _zombie_stubs(self.process.pid):
                if pid not in stubs:  # a stub that died before we saw it alive
                    stubs[pid] = StubProcess(pid, stat.start_time, "?", "?", "")
            self.stubs = stubs
        dead = self._dead_stubs()
        if dead and not self._stopping.wait(_CONFIRM_S):
            dead = self._dead_stubs()
        if not dead or self._stopping.is_set():
            return None
        described = [f"stub {s.instance} of model {s.model!r} (pid {s.pid}) {_describe_status(status)}"
                     for s, status in dead]
        return "; ".join(described) + (
            " (Triton never restarts a stub: the model would fail every request, and the requests"
            " the stub was answering would never end)")

    def _supervise(self) -> None:
        try:
            self._watch()
        except Exception as err:  # noqa: BLE001 - a bug here must not leave a dead server looking supervised
            log.exception("the tritonserver supervisor failed")
            self._give_up(f"the supervisor failed: {type(err).__name__}: {err}")

    def _watch(self) -> None:
        recent: list[float] = []  # when the restarts within restart_window began
        next_scan = time.monotonic() + _RESCAN_S
        while not self._stopping.is_set():
            rescan = time.monotonic() >= next_scan
            if rescan:
                next_scan = time.monotonic() + _RESCAN_S
            try:
                reason = self._find_failure(rescan)
            except Exception as err:  # noqa: BLE001 - keep watching whatever /proc says
                log.debug("supervisor check failed: %s", err)
                reason = None
            if reason is None:
                self._stopping.wait(_POLL_S)
                continue
            if not self._restart(reason, recent):
                return
            next_scan = time.monotonic() + _RESCAN_S

    def _restart(self, reason: str, recent: list[float]) -> bool:
        """Kill the server and start a new one on the same ports; False when it gave up."""
        detected = time.monotonic()
        while True:
            recent[:] = [t for t in recent if time.monotonic() - t < self.restart_window]
            if len(recent) >= self.max_restarts:
                self._give_up(f"{reason}; not restarting: {len(recent)} restarts within "
                              f"{self.restart_window:.0f} s already (max_restarts={self.max_restarts})")
                return False
            backoff = 0.0 if not recent else min(2.0 ** (len(recent) - 1), _MAX_BACKOFF_S)
            recent.append(time.monotonic())
            self._event(f"{reason}. Restarting tritonserver (restart {self.restarts + 1}"
                        + (f", in {backoff:.0f} s" if backoff else "") + ")")
            with self._lock:
                if self._stopping.is_set():
                    return False
                self._kill_group()  # ends the requests in flight: the clients see the connection close
            if self._stopping.wait(backoff):
                return False
            with self._lock:
                if self._stopping.is_set():
                    return False
                self._spawn()
                self.restarts += 1
            try:
                self._wait_ready()
            except ServeError as err:
                if self._stopping.is_set():
                    return False
                reason = f"restart {self.restarts} failed: {str(err).splitlines()[0]}"
                continue
            self.stubs = self._scan_stubs()
            self._event(f"tritonserver is serving again (pid {self.pid}, restart {self.restarts}, "
                        f"{time.monotonic() - detected:.1f} s after the failure was seen)")
            return True

    def _give_up(self, reason: str) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            self._kill_group()
        self.failure = self.failed(f"tritonserver keeps failing, gave up: {reason}")
        self._event(f"gave up: {reason}; the server is stopped")
        self._done.set()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"TritonServer({str(self.model_repository)!r}, http={self.http_url}, grpc={self.grpc_url}, {state})"


class _Stop(Exception):
    pass


def repository_server_args(model_repository: str | os.PathLike) -> list[str]:
    """tritonserver options a rendered repository's TensorRT plans need (version-compatible plans:
    a tensorrt backend option); [] for any other repository."""
    from ..engines.tensorrt import triton_server_args
    from ..manifest import MANIFEST_NAME

    try:
        manifest = json.loads((Path(model_repository) / "vlm" / "1" / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return []
    return triton_server_args(manifest.get("engines") or {})


def serve_forever(
    model_repository: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    http_port: int | None = None,
    grpc_port: int | None = None,
    metrics_port: int | None = None,
    log_file: str | os.PathLike | None = None,
    startup_timeout: float = STARTUP_TIMEOUT_S,
    openai_port: int | None = None,
    openai_model: str | None = None,
    openai_options: dict | None = None,
    echo=print,
) -> int:
    """Serve until Ctrl-C or SIGTERM, then stop the server cleanly; returns 0.

    With ``openai_port``, an OpenAI-compatible API (``serve.openai_api``) also listens there on
    ``host``, in front of the server's gRPC endpoint, naming the model ``openai_model`` (default:
    the repository folder's name); ``openai_options`` go to its ``create_app``. It stops first.

    Prints the endpoints once ready. Raises ServeError if the server cannot start or dies.
    """

    server = TritonServer(model_repository, host=host, http_port=http_port, grpc_port=grpc_port,
                          metrics_port=metrics_port, log_file=log_file, startup_timeout=startup_timeout,
                          extra_args=repository_server_args(model_repository), on_event=echo)
    old = {s: signal.signal(s, raising(_Stop)) for s in (signal.SIGINT, signal.SIGTERM)}
    api = None
    try:
        server.start()
        if openai_port is not None:
            from .openai_api import run_openai_server  # fastapi and uvicorn only when asked for

            model = openai_model or server.model_repository.name
            api = run_openai_server(server.grpc_url, host, openai_port, model, **(openai_options or {}))
        echo(f"Triton is ready (pid {server.pid}), serving {server.model_repository}")
        echo(f"  HTTP     http://{server.http_url}")
        echo(f"  gRPC     {server.grpc_url}")
        echo(f"  metrics  {server.metrics_url}")
        if api is not None:
            echo(f"  OpenAI   {api.url}  (model {model!r})")
        echo(f"  log      {server.log_file}")
        echo("Press Ctrl-C to stop.")
        # The supervisor restarts a server whose stub or process died; this returns only when it gave up.
        server.wait()
        if server.failure is not None:
            raise server.failure
        raise server.failed(f"tritonserver exited unexpectedly with code {server.process.returncode}")
    except (_Stop, KeyboardInterrupt):
        echo("Stopping Triton ...")
        # A second Ctrl-C while stopping must not leave the server half-stopped.
        for s in old:
            signal.signal(s, signal.SIG_IGN)
        if api is not None:
            api.stop()
        server.stop()
        echo("Stopped.")
        return 0
    finally:
        if api is not None:
            api.stop()
        if server.running:
            server.stop()
        for s, h in old.items():
            signal.signal(s, h)
