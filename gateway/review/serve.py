"""`seqguard review`: serve the review queue with uvicorn and print its URL."""
from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from pathlib import Path

from .config import ReviewConfig


def review_tokens(settings, run_dir: Path, log=print) -> list[bytes]:
    """The gateway's ADMIN tokens (the app writes labels and holds, the admin RPCs' job); with none
    configured, a generated one in run_dir/review.token (mode 600).

    A scoring token never opens it (a compromised payment client must not label or release), and
    there is no open console: no admin token means a fresh one only the operator can read.
    """
    tokens = settings.admin_tokens()
    if tokens:
        return tokens
    path = run_dir / "review.token"
    if not path.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    log(f"no SEQGUARD_ADMIN_TOKEN[_FILE] set: log in with the token in {path}")
    return [path.read_bytes().strip()]


def add_review_args(p) -> None:
    p.add_argument("--host", default=os.environ.get("SEQGUARD_REVIEW_HOST", ReviewConfig.host),
                   help="bind address (default loopback; put TLS in front before exposing it)")
    p.add_argument("--port", type=int, default=int(os.environ.get("SEQGUARD_REVIEW_PORT", ReviewConfig.port)))
    p.add_argument("--run-dir", default=os.environ.get("SEQGUARD_RUN_DIR", "runs/up"),
                   help="where a generated access token is kept when no gateway token is configured")
    p.add_argument("--scan-alerts", type=int, default=ReviewConfig.scan_alerts,
                   help="newest alerts read per page view (the queue is a window over the stream)")


class ReviewServer:
    """The review app on uvicorn inside the caller's event loop: `seqguard review`, or beside the
    gateway in one process (`seqguard up` can start() it after the gateway and stop() it before)."""

    def __init__(self, settings, config: ReviewConfig, tokens: list[bytes], log_level: str = "warning"):
        import uvicorn

        from .app import create_app

        class _Embedded(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                yield           # the embedding process owns SIGINT/SIGTERM (uvicorn would take them over)

        self.config = config
        self.server = _Embedded(uvicorn.Config(create_app(settings, config, tokens), host=config.host,
                                               port=config.port, log_level=log_level))
        self.url = f"http://{config.host}:{config.port}/"
        self._task: asyncio.Task | None = None

    async def start(self, timeout_s: float = 20.0) -> str:
        """Serve in the background; returns the URL once it accepts connections."""
        self._task = asyncio.create_task(self.server.serve())
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while not self.server.started:
            if self._task.done():
                self._task.result()         # raises what stopped it (e.g. the port is taken)
                raise RuntimeError(f"review app did not start on {self.url}")
            if loop.time() > end:
                await self.stop()
                raise TimeoutError(f"review app not serving on {self.url} after {timeout_s:.0f} s")
            await asyncio.sleep(0.05)
        return self.url

    async def stop(self, timeout_s: float = 10.0) -> None:
        if self._task is None:
            return
        self.server.should_exit = True
        try:
            await asyncio.wait_for(self._task, timeout_s)
        finally:
            self._task = None


def main_review(args) -> int:
    import signal

    from ..settings import Settings
    settings = Settings.load()
    cfg = ReviewConfig(host=args.host, port=args.port, scan_alerts=args.scan_alerts)
    review = ReviewServer(settings, cfg, review_tokens(settings, Path(args.run_dir)), log_level="info")

    async def run() -> None:
        url = await review.start()
        print(f"review queue: {url}  (Ctrl-C stops it)", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await review.stop()

    asyncio.run(run())
    return 0
