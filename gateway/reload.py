"""Hot model reload: notice a new artifact at settings.model_dir and switch to it without failing a request.

The model directory is usually a `current` symlink (artifacts/current -> <model_version>) that a
release job flips atomically; a reload is triggered by polling it (settings.model_poll_s) or by
SIGHUP. The new artifact (featuriser spec, detector/forests) is loaded off the event loop, its
Triton model version is checked ready and warmed with one real step, and only then does the
gateway swap engines. The coalescer reads its engine once per batch, so the switch happens
between two coalesced batches: a batch runs entirely on the old or entirely on the new model.
If anything fails the old model keeps serving and the reload is retried on the next poll.

Rules (settings.rules_path) reload the same way, on their own poll (settings.rules_poll_s) or on
SIGHUP: a file that does not load is rejected with a clear log line and the running rules stay.
"""
from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from seqguard.artifact import METADATA
from seqguard.rules import RuleSet, RulesError, load_rules

from .aio import cancel_and_wait

log = logging.getLogger("seqguard.gateway")


def artifact_marker(model_dir: str) -> tuple:
    """What changes when a new model is published: the resolved directory and its metadata file's mtime."""
    real = os.path.realpath(model_dir)
    try:
        st = os.stat(Path(real) / METADATA)
    except OSError:
        return (real, None)
    return (real, st.st_mtime_ns, st.st_size)


def start_polling(poll_s: float, check, name: str, failure: str) -> asyncio.Task | None:
    """Call `check` (sync or async) every poll_s seconds in a task (None when poll_s <= 0). A failing
    check is logged and the watcher goes on: what is live stays live."""
    if poll_s <= 0:
        return None

    async def poll() -> None:
        while True:
            await asyncio.sleep(poll_s)
            try:
                result = check()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:   # never let the watcher die
                log.exception(failure)
    return asyncio.get_running_loop().create_task(poll(), name=name)


class ModelReloader:
    def __init__(self, gateway, poll_s: float):
        self.gateway = gateway
        self.poll_s = poll_s
        self.marker = artifact_marker(gateway.settings.model_dir)
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self.reloads = 0
        self.last_error = ""

    def start(self) -> None:
        self._task = start_polling(self.poll_s, self.check, "model-reloader",
                                   "model reload check failed")   # the old model keeps serving

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def check(self, force: bool = False) -> bool:
        """Reload if the artifact changed (or always with force, e.g. on SIGHUP). True if a new model went live."""
        async with self._lock:
            marker = artifact_marker(self.gateway.settings.model_dir)
            if marker == self.marker and not force:
                return False
            try:
                changed = await self.gateway.reload_model()
            except Exception as e:  # noqa: BLE001 - reported, retried on the next poll
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("model reload failed, still serving %s: %s", self.gateway.artifact.model_version,
                            self.last_error)
                self.gateway.metrics.reloads.labels("failed").inc()
                return False
            self.marker = marker
            if changed:
                self.reloads += 1
            return changed


# --------------------------------------------------------------------------- rules

class LiveRules:
    """The rules in force (settings.rules_path), shared by the gateway and every engine it builds.

    A reload replaces `current` whole; an engine reads it once per batch, so a batch runs entirely
    on the old or entirely on the new rules, and a model reload keeps the rules in force.
    """

    def __init__(self, rules: RuleSet | None = None):
        self.current = rules


def rules_marker(path: str) -> tuple:
    """What changes when a rules file is edited or its symlink flipped."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return (real, None)
    return (real, st.st_mtime_ns, st.st_size)


class RulesReloader:
    """Polls settings.rules_path (every poll_s; 0 = SIGHUP only) and swaps in a new rules file.

    A file that does not load (bad TOML, an unknown field, a missing file) is rejected with a log
    line naming the rule and the field; the running rules stay in force and the file is tried
    again when it changes.
    """

    def __init__(self, path: str, live: LiveRules, poll_s: float):
        self.path, self.live, self.poll_s = path, live, poll_s
        self.marker = rules_marker(path)
        self._task: asyncio.Task | None = None
        self.reloads = 0
        self.rejected = 0
        self.last_error = ""

    def start(self) -> None:
        self._task = start_polling(self.poll_s, self.check, "rules-reloader",
                                   "rules reload check failed")   # the running rules stay in force

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    def check(self, force: bool = False) -> bool:
        """Load the file if it changed (or always with force); True if new rules went live."""
        marker = rules_marker(self.path)
        if marker == self.marker and not force:
            return False
        self.marker = marker              # a rejected file is not retried until it changes again
        running = self.live.current.version_tag if self.live.current else "none"
        try:
            rules = load_rules(self.path)
        except RulesError as e:
            self.rejected += 1
            self.last_error = str(e)
            log.error("rules file rejected, still enforcing %s: %s", running, e)
            return False
        if self.live.current is not None and rules.digest == self.live.current.digest:
            return False
        self.live.current = rules
        self.reloads += 1
        log.info("rules reloaded: %s -> %s (%d rules)", running, rules.version_tag, len(rules.rules))
        return True
