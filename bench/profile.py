"""py-spy profiles of a server process under load, summarised as "where the time goes".

    stop = record(pid, seconds, out_path)    # py-spy record in the background (raw collapsed stacks)
    ...drive load...
    summary = stop()                         # {"samples", "self": [...], "by_seqguard_frame": [...]}

Two views of the same samples, each as (frame, share of the process's non-idle samples):
  * self: the innermost frame (where the CPU was when sampled), e.g. grpc's C core, protobuf, a numba kernel.
  * by_seqguard_frame: the innermost frame in seqguard's own code (gateway/, seqguard/), its callees
    included, so a Redis client call or an ONNX Runtime run is charged to the gateway function that
    made it; samples with no seqguard frame on the stack (gRPC server, event loop) are charged to
    their innermost frame's module.
py-spy needs ptrace rights on the pid (root, or a parent process, or ptrace_scope 0).

    python -m bench.profile RAW_FILE          # summarise an existing raw profile
"""
from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from .procs import ROOT

OWN_DIRS = ("gateway/", "seqguard/")     # py-spy names files relative to their sys.path entry
# Innermost frames of a thread that is waiting in C (the event loop's selector, whichever it is; an
# idle thread pool worker; a C-level thread body such as gRPC's poller; a lock): py-spy samples them
# too; they are not CPU spent.
IDLE_LEAVES = {"EpollSelector.select", "select", "poll", "_worker", "Thread.run", "Condition.wait",
               "Event.wait", "Thread._wait_for_tstate_lock", "SimpleQueue.get", "Queue.get"}
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def find_py_spy() -> str | None:
    return shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")


def record(pid: int, seconds: float, out_path: Path, rate: int = 100):
    """Start py-spy on pid; the returned stop() ends it (SIGINT writes the file) and summarises.
    None when py-spy is not installed."""
    exe = find_py_spy()
    if exe is None:
        return None
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(out_path.with_suffix(".log"), "wb")
    proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
                             "--duration", str(max(1, int(seconds) + 5)), "--output", str(out_path)],
                            stdout=log, stderr=log)

    def stop() -> dict:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        if not out_path.exists():
            return {"error": f"py-spy wrote nothing (rc {proc.returncode}); see {out_path.with_suffix('.log')}"}
        return {"file": str(out_path), **summarise(out_path.read_text())}
    time.sleep(0.5)                             # attached before the load starts
    return stop


def _short(path: str) -> str:
    for marker in ("site-packages/", str(ROOT) + "/", "/lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _frame(raw: str) -> tuple[str, str]:
    m = FRAME.match(raw.strip())
    return (m["func"], m["file"]) if m else (raw.strip(), "")


def _own(file: str) -> bool:
    return file.startswith(OWN_DIRS) or any("/" + d in file for d in OWN_DIRS)


def summarise(raw_text: str, top: int = 12) -> dict:
    """Shares of the two views (module docstring) from py-spy's raw output ('f1;f2;...;fn COUNT')."""
    leaf, own, by_file = Counter(), Counter(), Counter()
    total = idle = 0
    for line in raw_text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";")]
        if frames[-1][0] in IDLE_LEAVES or frames[-1][1].endswith("selectors.py"):
            idle += n
            continue
        total += n
        func, file = frames[-1]
        leaf[f"{func} ({_short(file)})"] += n
        mine = [f for f in frames if _own(f[1])]
        if mine:
            func, file = mine[-1]
            own[f"{func} ({_short(file)})"] += n
            by_file[_short(file)] += n
        else:
            own[f"(no seqguard frame) {_short(file).split('/')[0]}"] += n
            by_file["(no seqguard frame)"] += n
    as_shares = lambda c: [(k, v / total) for k, v in c.most_common(top)] if total else []  # noqa: E731
    return {"samples": total, "idle_samples": idle, "self": as_shares(leaf), "by_seqguard_frame": as_shares(own),
            "by_seqguard_file": as_shares(by_file)}


def markdown(title: str, s: dict) -> str:
    if not s or "error" in s or not s.get("samples"):
        return f"{title}: no profile ({(s or {}).get('error', 'py-spy not installed')})\n"
    lines = [f"{title}: {s['samples']} busy samples at 100 Hz (idle waits left out: {s.get('idle_samples', 0)}); "
             "shares of the busy samples", "",
             "| innermost seqguard frame (callees included) | share | innermost frame (self) | share |",
             "|---|---:|---|---:|"]
    a, b = s["by_seqguard_frame"], s["self"]
    for i in range(max(len(a), len(b))):
        left = f"`{a[i][0]}` | {a[i][1] * 100:.1f}%" if i < len(a) else " | "
        right = f"`{b[i][0]}` | {b[i][1] * 100:.1f}%" if i < len(b) else " | "
        lines.append(f"| {left} | {right} |")
    files = ", ".join(f"{k} {v * 100:.0f}%" for k, v in s.get("by_seqguard_file", []))
    return "\n".join(lines) + f"\n\nBy seqguard file (callees included): {files}.\n"


if __name__ == "__main__":
    print(markdown(sys.argv[1], summarise(Path(sys.argv[1]).read_text())))
