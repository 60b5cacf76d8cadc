"""Benchmark servers as child processes: each prints one ``READY {json}`` line on stdout when it
serves, then logs to stderr only, and stops cleanly on SIGTERM.

Server side::   announce({"port": port, ...}); await wait_for_signal()
Parent side::   srv = ServerProcess("echo", [sys.executable, "-m", "bench.echo_server"], log_path)
                info = srv.start(); ...; srv.stop()
"""
from __future__ import annotations

import asyncio
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READY = "READY "


# ----------------------------------------------------------------------------- server side
def announce(info: dict) -> None:
    """Tell the parent we serve; from here on anything written to stdout goes to stderr (the
    parent stops reading stdout after this line, and a full pipe would block the server)."""
    info = {"pid": os.getpid(), **info}
    sys.stdout.write(READY + json.dumps(info) + "\n")
    sys.stdout.flush()
    os.dup2(2, 1)


async def wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- parent side
class ServerError(RuntimeError):
    pass


class ServerProcess:
    def __init__(self, name: str, argv: list[str], log_path: Path, ready_timeout: float = 180.0,
                 env: dict | None = None):
        self.name, self.argv, self.log_path = name, argv, Path(log_path)
        self.ready_timeout = ready_timeout
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def start(self) -> dict:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(self.log_path, "ab") as logf:
            # own session: a Ctrl-C in the terminal reaches us, and we stop the server in order
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=logf, cwd=ROOT, env=env, start_new_session=True)
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + self.ready_timeout
        buf = b""
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServerError(f"{self.name}: not ready after {self.ready_timeout:.0f} s; log "
                                      f"{self.log_path}:\n{self.log_tail()}")
                if sel.select(timeout=min(left, 0.5)):
                    chunk = os.read(self.proc.stdout.fileno(), 65536)
                    if not chunk:
                        self.proc.wait(5)
                        raise ServerError(f"{self.name}: exited with {self.proc.returncode} before it was "
                                          f"ready; log {self.log_path}:\n{self.log_tail()}")
                    buf += chunk
                    for line in buf.decode(errors="replace").splitlines():
                        if line.startswith(READY):
                            self.info = json.loads(line[len(READY):])
                            return self.info
                elif self.proc.poll() is not None:
                    raise ServerError(f"{self.name}: exited with {self.proc.returncode} before it was "
                                      f"ready; log {self.log_path}:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise
        finally:
            sel.close()

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM, wait; then SIGKILL its process group and the service pids it announced."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait(10)
                for key in ("redis_pid", "triton_pid"):   # children in their own sessions
                    pid = self.info.get(key)
                    if pid:
                        try:
                            os.killpg(pid, signal.SIGKILL)
                        except (ProcessLookupError, PermissionError):
                            pass
        if proc.stdout:
            proc.stdout.close()
        self.proc = None
        return proc.returncode

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
