"""`seqguard up`: Redis + Triton + the gateway on loopback, healthy before it says so, stopped together.

LocalStack is also what the demo and the tests use, so the path a user runs is the path tested.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import sys
from pathlib import Path

from seqguard.artifact import ModelArtifact
from seqguard.services import RedisServer, TritonServer

from .server import Gateway
from .settings import Settings


def ensure_key_file(run_dir: Path) -> str:
    """A per-deployment pseudonymisation key, created once, readable by the owner only."""
    path = run_dir / "pseudonym.key"
    if not path.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return str(path)


class LocalStack:
    """Starts redis-server, tritonserver and the gateway in this process's event loop."""

    def __init__(self, model_dir: str, run_dir: str, *, host: str = "127.0.0.1", port: int = 50051,
                 redis_port: int | None = None, triton_http_port: int | None = None,
                 triton_grpc_port: int | None = None, triton_metrics_port: int | None = None,
                 redis_appendonly: bool = True, redis_appendfsync: str = "everysec",
                 review_port: int | None = None, **settings_overrides):
        self.model = ModelArtifact.load(model_dir)           # fail fast on a bad model dir
        self.run_dir = Path(run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.host, self.port = host, port
        self.redis = RedisServer(redis_port, run_dir=self.run_dir / "redis", appendonly=redis_appendonly,
                                 appendfsync=redis_appendfsync)
        self.triton = TritonServer(self.model.repository_dir, models=[self.model.triton_model_name],
                                   grpc_port=triton_grpc_port, http_port=triton_http_port,
                                   metrics_port=triton_metrics_port, run_dir=self.run_dir / "triton")
        self.settings_overrides = settings_overrides
        self.gateway: Gateway | None = None
        self.review_port = review_port      # None: no review queue; 0: a free port
        self.review = None                  # gateway.review.serve.ReviewServer once started

    async def start(self, log=print) -> Settings:
        try:
            self.redis.start()
            self.triton.start()
            t_r = await asyncio.to_thread(self.redis.wait_ready, 30)
            log(f"redis     ready on {self.redis.address} ({t_r:.1f}s; AOF "
                f"{'appendfsync ' + self.redis.appendfsync if self.redis.appendonly else 'off'})")
            t_t = await asyncio.to_thread(self.triton.wait_ready, 120)
            log(f"triton    ready: gRPC {self.triton.grpc_url}, HTTP {self.triton.http_url}, "
                f"metrics {self.triton.metrics_url} ({t_t:.1f}s)")
            overrides = {"pseudonym_key_file": None if (os.environ.get("SEQGUARD_PSEUDONYM_KEY") or
                                                        os.environ.get("SEQGUARD_PSEUDONYM_KEY_FILE"))
                         else ensure_key_file(self.run_dir), **self.settings_overrides}
            settings = Settings.load(model_dir=str(self.model.path), host=self.host, port=self.port,
                                     redis_port=self.redis.port, triton_url=self.triton.grpc_url,
                                     triton_model=self.model.triton_model_name, **overrides)
            self.gateway = Gateway(settings)
            self.port = await self.gateway.start()
            log(f"gateway   ready on {self.host}:{self.port} (seqguard.v1.RiskScoring, health, reflection; "
                f"model {self.model.model_version})")
            if self.review_port is not None:
                await self._start_review(settings, log)
            return settings
        except BaseException:
            await self.stop()
            raise

    async def _start_review(self, settings: Settings, log) -> None:
        from seqguard.services import free_port

        from .review.config import ReviewConfig
        from .review.serve import ReviewServer, review_tokens
        cfg = ReviewConfig(host=self.host, port=self.review_port or free_port())
        self.review = ReviewServer(settings, cfg, review_tokens(settings, self.run_dir, log=log))
        log(f"review    queue at {await self.review.start()} (fraud analysts: alerts, cases, holds, labels)")

    async def stop(self) -> None:
        if self.review is not None:
            await self.review.stop()
            self.review = None
        if self.gateway is not None:
            await self.gateway.stop()
            self.gateway = None
        await asyncio.to_thread(self.triton.stop)
        await asyncio.to_thread(self.redis.stop)

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc):
        await self.stop()


def main_up(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stack = LocalStack(args.model, args.run_dir, host=args.host, port=args.port, redis_port=args.redis_port,
                       triton_http_port=args.triton_http_port, triton_grpc_port=args.triton_grpc_port,
                       triton_metrics_port=args.triton_metrics_port,
                       redis_appendfsync=getattr(args, "redis_appendfsync", "everysec"),
                       review_port=None if getattr(args, "no_review", False) else args.review_port)

    async def run() -> None:
        await stack.start()
        print("seqguard is up; Ctrl-C (or SIGTERM) stops the gateway, Triton and Redis", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("stopping: draining the gateway, then Triton and Redis", flush=True)
        await stack.stop()
        print("stopped", flush=True)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main_up(None))
