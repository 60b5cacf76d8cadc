"""Server CPU time from /proc/<pid>/stat, for "CPU milliseconds per request".

For a process *tree* (a pid and all its live descendants, found by scanning /proc for
parent ids) the meter sums utime + stime of every live member plus cutime + cstime (time of
children that already exited and were reaped). That sum only grows, so the delta over a
window is the CPU the tree used in it: Triton's Python-backend stub processes and the
redis-server / tritonserver children of the gateway process are all counted.

    meter = CpuMeter({"server": [pid]}, tree=True)
    meter.start(); ...; used = meter.stop()      # {"server": seconds}
"""
from __future__ import annotations

import os
import time
from typing import Iterable

CLK_TCK = os.sysconf("SC_CLK_TCK")


def read_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds incl. reaped children) of one process; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the LAST ')'
    rest = data[data.rindex(b")") + 2:].split()
    ppid = int(rest[1])
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
    return ppid, (utime + stime + cutime + cstime) / CLK_TCK


def own_cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), without children."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    rest = data[data.rindex(b")") + 2:].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = read_stat(int(name))
        if st is not None:
            kids.setdefault(st[0], []).append(int(name))
    return kids


def descendants(pids: Iterable[int]) -> set[int]:
    """The given pids and every live process below them."""
    kids = _children_map()
    out, todo = set(), list(pids)
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.add(p)
        todo.extend(kids.get(p, ()))
    return out


def tree_cpu_seconds(pids: Iterable[int]) -> float:
    total = 0.0
    for p in descendants(pids):
        st = read_stat(p)
        if st is not None:
            total += st[1]
    return total


class CpuMeter:
    """CPU seconds used by named groups of processes between start() and stop().

    groups: name -> (pids, tree). tree=True counts the pids' whole process trees (with their
    reaped children); tree=False counts those processes alone (their threads, no children).
    """

    def __init__(self, groups: dict[str, tuple[list[int], bool]]):
        self.groups = {k: (list(p), t) for k, (p, t) in groups.items()}
        self._t0: dict[str, float] = {}
        self._wall0 = 0.0
        self.wall_s = 0.0

    def _sample(self) -> dict[str, float]:
        out = {}
        for name, (pids, tree) in self.groups.items():
            out[name] = tree_cpu_seconds(pids) if tree else sum(own_cpu_seconds(p) for p in pids)
        return out

    def start(self) -> None:
        self._wall0 = time.monotonic()
        self._t0 = self._sample()

    def stop(self) -> dict[str, float]:
        t1 = self._sample()
        self.wall_s = time.monotonic() - self._wall0
        return {k: max(0.0, t1[k] - self._t0.get(k, 0.0)) for k in t1}


def measure(pids: list[int], seconds: float) -> float:
    """CPU seconds a process tree used over the next `seconds` (a command-line helper)."""
    m = CpuMeter({"x": (pids, True)})
    m.start()
    time.sleep(seconds)
    return m.stop()["x"]


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="CPU used by process trees over a window")
    ap.add_argument("pids", type=int, nargs="+")
    ap.add_argument("--seconds", type=float, default=5.0)
    a = ap.parse_args()
    used = measure(a.pids, a.seconds)
    print(f"{used:.3f} CPU s in {a.seconds:.1f} s ({used / a.seconds * 100:.0f}% of one core)")
