"""`seqguard review`: serve the review queue with uvicorn and print its URL."""
from __future__ import annotations

import asyncio
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


def main_review(args) -> int:
    import uvicorn

    from ..settings import Settings
    from .app import create_app
    settings = Settings.load()
    cfg = ReviewConfig(host=args.host, port=args.port, scan_alerts=args.scan_alerts)
    app = create_app(settings, cfg, review_tokens(settings, Path(args.run_dir)))
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info"))
    print(f"review queue: http://{cfg.host}:{cfg.port}/  (Ctrl-C stops it)", flush=True)
    asyncio.run(server.serve())
    return 0
