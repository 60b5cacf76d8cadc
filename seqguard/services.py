"""Real local services for seqguard: a Redis server and a Triton Inference Server (CPU).

Both run as child processes on loopback ports, log to a file in a run directory, and are
stopped with SIGTERM, then SIGKILL after a timeout; the child is always reaped, and whatever
is left of its process group (Triton's Python-backend stub processes) is killed with it::

    repo = write_model_repository("runs/repo", "artifacts/step.onnx")
    with TritonServer(repo, models=["seqguard_encoder"]) as triton:
        client = tritonclient.grpc.InferenceServerClient(triton.grpc_url)

Triton comes from the ``nvidia-pytriton`` wheel, which bundles a real tritonserver binary,
its libraries and the Python backend. What it takes to run it (found on Debian 12):

* the backend directory must hold ``python/{libtriton_python.so, triton_python_backend_utils.py,
  triton_python_backend_stub}`` with the stub built for this Python (3.11);
* ``LD_LIBRARY_PATH`` must include ``site-packages/nvidia_pytriton.libs``;
* the stub imports model.py's modules (onnxruntime, numpy) through the ``python3`` it finds on
  ``PATH``, so the virtualenv's ``bin`` goes first on ``PATH``;
* the stub links the system libpython3.11: the venv must be made from that same Python
  (Debian's /usr/bin/python3.11), not e.g. a pyenv 3.11.x, or the stdlib does not match.
"""
from __future__ import annotations

import atexit
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

LOOPBACK = "127.0.0.1"


class ServiceError(RuntimeError):
    """A service could not be found, started or made ready (message carries its log tail)."""


class ServiceNotInstalled(ServiceError):
    """The program behind a service is not installed (message says how to install it)."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it)."""
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = LOOPBACK) -> list[int]:
    """``n`` distinct TCP ports that were free on ``host`` a moment ago."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# --------------------------------------------------------------------------------------------
# Triton installation (from the nvidia-pytriton wheel)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TritonInstall:
    """Paths of a wheel-bundled tritonserver."""
    binary: Path               # .../pytriton/tritonserver/bin/tritonserver
    libs_dir: Path             # .../site-packages/nvidia_pytriton.libs (goes on LD_LIBRARY_PATH)
    python_backend_dir: Path   # .../pytriton/tritonserver/backends/python
    stub: Path                 # .../python_backend_stubs/3.X/triton_python_backend_stub

    @property
    def libtriton_python(self) -> Path:
        return self.python_backend_dir / "libtriton_python.so"

    @property
    def backend_utils(self) -> Path:
        return self.python_backend_dir / "triton_python_backend_utils.py"


def find_tritonserver(python_version: str | None = None) -> TritonInstall:
    """Locate tritonserver, its libraries and the Python backend of the nvidia-pytriton wheel.

    ``python_version`` ("3.11") picks the backend stub; default: this interpreter's version,
    which is what the stub must match. Raises :class:`ServiceNotInstalled` if missing.
    """
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServiceNotInstalled(
            "Triton Inference Server not found: the nvidia-pytriton wheel is not installed in "
            f"{sys.prefix}. Install it with: pip install 'nvidia-pytriton==0.7.0' "
            "(or pip install -e '.[serve]'); it needs glibc >= 2.35 and numpy < 2.")
    pkg = Path(next(iter(spec.submodule_search_locations)))
    root = pkg / "tritonserver"
    pyver = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    install = TritonInstall(
        binary=root / "bin" / "tritonserver",
        libs_dir=pkg.parent / "nvidia_pytriton.libs",
        python_backend_dir=root / "backends" / "python",
        stub=root / "python_backend_stubs" / pyver / "triton_python_backend_stub",
    )
    required = [install.binary, install.libs_dir, install.libtriton_python,
                install.backend_utils]
    missing = [str(p) for p in required if not p.exists()]
    if missing:
        raise ServiceNotInstalled(
            f"nvidia-pytriton at {pkg} is incomplete (missing {', '.join(missing)}); "
            "reinstall it: pip install --force-reinstall 'nvidia-pytriton==0.7.0'")
    if not install.stub.exists():
        have = sorted(p.name for p in (root / "python_backend_stubs").glob("*"))
        raise ServiceNotInstalled(
            f"nvidia-pytriton has no Python backend stub for Python {pyver} "
            f"(has: {', '.join(have) or 'none'}); use a matching Python")
    return install


def prepare_backend_dir(dest: str | os.PathLike, install: TritonInstall | None = None, *,
                        copy: bool = False) -> Path:
    """Build ``dest/python/`` (libtriton_python.so, triton_python_backend_utils.py, the stub).

    Returns ``dest``, the value for ``tritonserver --backend-directory``. Symlinks by default
    (``copy=True`` copies); existing entries are replaced, so calling it again is harmless.
    """
    install = install or find_tritonserver()
    dest = Path(dest).resolve()
    py_dir = dest / "python"
    py_dir.mkdir(parents=True, exist_ok=True)
    for src in (install.libtriton_python, install.backend_utils, install.stub):
        target = py_dir / src.name
        if target.is_symlink() or target.exists():
            target.unlink()
        if copy:
            shutil.copy2(src, target)
        else:
            target.symlink_to(src.resolve())
    return dest


def _venv_bin() -> Path:
    """The bin/ directory of the running interpreter's environment (the venv when in one)."""
    return Path(sys.prefix) / "bin"


# --------------------------------------------------------------------------------------------
# Managed child processes
# --------------------------------------------------------------------------------------------
_LIVE: "set[ManagedService]" = set()   # started and not yet stopped


@atexit.register
def _stop_leftovers() -> None:  # a crashed test run must not leave servers behind
    for service in list(_LIVE):
        try:
            service.stop(timeout=3)
        except Exception:  # noqa: BLE001
            pass


class ManagedService:
    """One server process: start / wait_ready / stop, log file, context manager.

    Subclasses define ``name``, :meth:`_command`, :meth:`_is_ready` and may extend
    :meth:`_env`.
    """
    name = "service"
    stop_timeout = 10.0
    # Log lines worth quoting when startup fails (regex; None: just the log's tail).
    error_line_re: "re.Pattern[str] | None" = None
    error_line_ignore_re: "re.Pattern[str] | None" = None

    def __init__(self, run_dir: str | os.PathLike | None = None, host: str = LOOPBACK):
        if run_dir is None:
            run_dir = tempfile.mkdtemp(prefix=f"seqguard-{self.name}-")
        self.run_dir = Path(run_dir).resolve()
        self.host = host
        self.log_path = self.run_dir / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None
        self._t_start = 0.0

    # -- subclass hooks ------------------------------------------------------------------------
    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def _is_ready(self) -> bool:
        raise NotImplementedError

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self._exit_status() is None

    def _exit_status(self) -> int | None:
        """The child's exit status once it has exited, else None. Does NOT reap it: until
        stop() reaps, its pid (= process group id) cannot be reused by another process."""
        proc = self.proc
        if proc.returncode is not None:
            return proc.returncode
        try:
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped behind our back
            return proc.poll()
        if info is None:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status

    def start(self) -> "ManagedService":
        """Launch the process (does not wait for readiness; see :meth:`wait_ready`)."""
        if self.running:
            raise ServiceError(f"{self.name} is already running (pid {self.pid})")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cmd = self._command()
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} $ "
                      f"{' '.join(cmd)}\n".encode())
            log.flush()
            self._t_start = time.monotonic()
            # Own session/process group: signals from the terminal don't hit it, and stop()
            # can kill the whole group (Triton's stub processes) by the child's id.
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=self._env(),
                                         cwd=self.run_dir, start_new_session=True)
        _LIVE.add(self)
        return self

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Block until ready; return seconds since start(). Raises with the log tail if the
        process exits first or ``timeout`` passes."""
        if self.proc is None:
            raise ServiceError(f"{self.name} was not started")
        deadline = time.monotonic() + timeout
        while True:
            code = self._exit_status()
            if code is not None:
                raise ServiceError(f"{self.name} exited with code {code} during startup; "
                                   + self._startup_report())
            if self._is_ready():
                self.startup_s = time.monotonic() - self._t_start
                return self.startup_s
            if time.monotonic() > deadline:
                raise ServiceError(f"{self.name} not ready after {timeout:.0f} s; "
                                   + self._startup_report())
            time.sleep(0.05)

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL (whole process group) after ``timeout`` s; always reaps.

        Returns the exit code (None if it was never started). Safe to call twice.
        """
        proc = self.proc
        if proc is None:
            return None
        timeout = self.stop_timeout if timeout is None else timeout
        if proc.returncode is None:
            if self._exit_status() is None:
                try:  # os.kill, not send_signal(): that may reap, freeing the group id
                    os.kill(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                deadline = time.monotonic() + timeout
                while self._exit_status() is None and time.monotonic() < deadline:
                    time.sleep(0.02)
            # The child has exited (a zombie, not reaped, so its process group id cannot be
            # reused yet) or ignored SIGTERM: kill what is left of its group, then reap.
            if proc.returncode is None:  # still unreaped: the group id is still ours
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            proc.wait()
        _LIVE.discard(self)
        return proc.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _startup_report(self, tail_lines: int = 15, max_errors: int = 12,
                        width: int = 600) -> str:
        """Error lines of this run's log (if the subclass knows them) plus the log's tail."""
        parts = []
        if self.error_line_re is not None:
            try:
                text = self.log_path.read_text(errors="replace")
            except OSError:
                text = ""
            run = text.rsplit("\n==== ", 1)[-1]   # this start() only
            errors = [ln[:width] for ln in run.splitlines()
                      if self.error_line_re.search(ln)
                      and not (self.error_line_ignore_re and self.error_line_ignore_re.search(ln))]
            if errors:
                parts.append("errors in the log:\n" + "\n".join(errors[-max_errors:]))
        parts.append(f"log {self.log_path} ends with:\n{self.log_tail(tail_lines)}")
        return "\n".join(parts)

    def __enter__(self):
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.address} {state} pid={self.pid}>"

    @property
    def address(self) -> str:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------
REDIS_FALLBACK_PATHS = ("/usr/bin/redis-server", "/usr/local/bin/redis-server")


def find_redis_server() -> str:
    """Path of ``redis-server`` (PATH first); :class:`ServiceNotInstalled` if there is none."""
    found = shutil.which("redis-server") or next(
        (p for p in REDIS_FALLBACK_PATHS if os.access(p, os.X_OK)), None)
    if found is None:
        raise ServiceNotInstalled("redis-server not found on PATH; install it with: "
                                  "apt-get install -y redis-server")
    return found


class RedisServer(ManagedService):
    """A ``redis-server`` on a loopback port with its data in ``run_dir/data``.

    No RDB snapshots (``--save ''``); ``appendonly=True`` turns on the AOF, fsynced per
    ``appendfsync``: "everysec" (every write reaches the kernel before Redis answers it, so a
    crash of the Redis process loses nothing; a crash of the HOST can lose up to ~1 s of answered
    updates) or "always" (fsynced before the answer: survives a host crash too, at a write
    latency cost; docs/reliability.md has both measured).
    """
    name = "redis"

    def __init__(self, port: int | None = None, *, run_dir: str | os.PathLike | None = None,
                 password: str | None = None, appendonly: bool = False, appendfsync: str = "everysec",
                 executable: str | None = None, extra_args: Sequence[str] = ()):
        super().__init__(run_dir)
        if appendfsync not in ("always", "everysec"):
            raise ValueError(f"appendfsync must be always or everysec, got {appendfsync!r}")
        self.port = port or free_port()
        self.password = password
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.extra_args = list(extra_args)
        self.executable = executable or find_redis_server()

    @property
    def data_dir(self) -> Path:
        return self.run_dir / "data"

    def _command(self) -> list[str]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [self.executable, "--port", str(self.port), "--bind", self.host,
               "--daemonize", "no", "--save", "",
               "--appendonly", "yes" if self.appendonly else "no",
               "--appendfsync", self.appendfsync, "--dir", str(self.data_dir)]
        if self.password:
            cmd += ["--requirepass", self.password]
        return cmd + self.extra_args

    def _resp(self, *args: str) -> bytes:
        out = [f"*{len(args)}\r\n".encode()]
        for a in args:
            b = a.encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        return b"".join(out)

    def _is_ready(self) -> bool:
        """PING answered with PONG (not -LOADING while the AOF is replayed)."""
        msg = self._resp("PING")
        replies = 1
        if self.password:
            msg, replies = self._resp("AUTH", self.password) + msg, 2
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as s:
                s.sendall(msg)
                buf = b""
                while buf.count(b"\r\n") < replies:
                    chunk = s.recv(256)
                    if not chunk:
                        break
                    buf += chunk
                return b"+PONG\r\n" in buf
        except OSError:
            return False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def client(self, **kwargs):
        """A redis-py client for this server (``redis.Redis``; extra kwargs passed on)."""
        import redis

        return redis.Redis(host=self.host, port=self.port, password=self.password, **kwargs)


# --------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------
class TritonServer(ManagedService):
    """A real ``tritonserver`` (CPU only) serving ``model_repository`` on loopback ports.

    ``models``: names whose ``/v2/models/NAME/ready`` must answer 200 before
    :meth:`wait_ready` returns (the server's own ``/v2/health/ready`` is always checked).
    ``backend_dir``: a directory made by :func:`prepare_backend_dir` (default: built in
    ``run_dir/backends``).
    """
    name = "triton"
    stop_timeout = 15.0
    error_line_re = re.compile(r"^E\d{4} |^error: |Failed to initialize Python stub")
    error_line_ignore_re = re.compile(r"CudaDriverHelper|CUDA driver")   # harmless on CPU

    def __init__(self, model_repository: str | os.PathLike, *,
                 models: Iterable[str] = (),
                 grpc_port: int | None = None, http_port: int | None = None,
                 metrics_port: int | None = None,
                 run_dir: str | os.PathLike | None = None,
                 install: TritonInstall | None = None,
                 backend_dir: str | os.PathLike | None = None,
                 model_control_mode: str = "none", log_verbose: int = 0,
                 exit_timeout_s: int = 5, extra_args: Sequence[str] = ()):
        self.install = install or find_tritonserver()
        super().__init__(run_dir)
        self.model_repository = Path(model_repository).resolve()
        self.models = list(models)
        spare = iter(free_ports(3))
        self.grpc_port = grpc_port or next(spare)
        self.http_port = http_port or next(spare)
        self.metrics_port = metrics_port or next(spare)
        if len({self.grpc_port, self.http_port, self.metrics_port}) != 3:
            raise ValueError("grpc, http and metrics ports must differ")
        self.backend_dir = Path(backend_dir).resolve() if backend_dir else None
        self.model_control_mode = model_control_mode
        self.log_verbose = log_verbose
        self.exit_timeout_s = exit_timeout_s
        self.extra_args = list(extra_args)

    def _command(self) -> list[str]:
        if not self.model_repository.is_dir():
            raise ServiceError(f"model repository not found: {self.model_repository}")
        if self.backend_dir is None:
            self.backend_dir = prepare_backend_dir(self.run_dir / "backends", self.install)
        return [
            str(self.install.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self.backend_dir}",
            f"--model-control-mode={self.model_control_mode}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            "--allow-metrics=true", "--allow-gpu-metrics=false", "--allow-cpu-metrics=true",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]

    def _env(self) -> dict[str, str]:
        env = super()._env()
        ld = env.get("LD_LIBRARY_PATH", "")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(self.install.libs_dir), ld) if p)
        # The stub runs model.py with the python3 it finds on PATH: make it the venv's.
        env["PATH"] = os.pathsep.join(p for p in (str(_venv_bin()), env.get("PATH", "")) if p)
        env.pop("PYTHONHOME", None)
        return env

    # Loopback only: never route readiness probes through an http_proxy from the environment.
    _opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _http_ok(self, path: str) -> bool:
        try:
            with self._opener.open(self.http_url + path, timeout=1.0) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _is_ready(self) -> bool:
        return self._http_ok("/v2/health/ready") and all(
            self._http_ok(f"/v2/models/{m}/ready") for m in self.models)

    def is_model_ready(self, model: str, version: str | int | None = None) -> bool:
        suffix = f"/versions/{version}" if version is not None else ""
        return self._http_ok(f"/v2/models/{model}{suffix}/ready")

    @property
    def address(self) -> str:
        """gRPC ``host:port``: what ``tritonclient.grpc.InferenceServerClient`` takes."""
        return self.grpc_url

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"
