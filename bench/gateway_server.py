"""The system under test as one child process: Redis + Triton + the seqguard gateway.

Default: gateway.up.LocalStack (the path `seqguard up`, the demo and the tests run), with
the Redis AOF off (we measure serving, not disk). With --triton-url the gateway talks to an
already running Triton (e.g. a GPU one) and only Redis is started here; that Triton's CPU is
not counted in the server CPU then. With --set encoder=local no Triton is involved: the gateway
runs the model on ONNX Runtime in its own process.

    python -m bench.gateway_server --model DIR --run-dir DIR [--triton-url H:P --triton-model NAME]
                                   [--set coalesce_max_wait_us=200 ...]
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from .procs import announce, log, wait_for_signal


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for p in pairs:
        k, sep, v = p.partition("=")
        if not sep:
            raise SystemExit(f"--set wants key=value, got {p!r}")
        out[k.strip()] = v.strip()
    return out


async def serve(a) -> None:
    from seqguard.gateway.up import LocalStack, ensure_key_file
    overrides = _overrides(a.set)
    local_encoder = overrides.get("encoder") == "local"
    if a.triton_url or local_encoder:       # no Triton of our own: an external one, or none at all
        from pathlib import Path

        from seqguard.gateway.server import Gateway
        from seqguard.gateway.settings import Settings
        from seqguard.artifact import ModelArtifact
        from seqguard.services import RedisServer

        model = ModelArtifact.load(a.model)
        run_dir = Path(a.run_dir).resolve()
        redis = RedisServer(run_dir=run_dir / "redis", appendonly=False)
        redis.start()
        try:
            await asyncio.to_thread(redis.wait_ready, 30)
            settings = Settings.load(model_dir=str(model.path), host="127.0.0.1", port=0, redis_port=redis.port,
                                     triton_url=a.triton_url or "127.0.0.1:1",
                                     triton_model=a.triton_model or model.triton_model_name,
                                     pseudonym_key_file=ensure_key_file(run_dir), **overrides)
            gw = Gateway(settings)
            port = await gw.start()
            log(f"gateway on 127.0.0.1:{port} ("
                f"{'local ONNX Runtime encoder' if local_encoder else 'external triton ' + a.triton_url})")
            announce({"port": port, "system": "gateway", "redis_pid": redis.pid, "redis_port": redis.port,
                      "triton_pid": None, "triton_url": "" if local_encoder else a.triton_url,
                      "triton_model": settings.triton_model, "model_version": model.model_version,
                      "settings": {k: getattr(settings, k) for k in ("deadline_ms", "triton_timeout_ms",
                                   "coalesce_max_events", "coalesce_max_wait_us", "max_in_flight")}})
            await wait_for_signal()
            await gw.stop(grace=1.0)
        finally:
            await asyncio.to_thread(redis.stop)
        return

    stack = LocalStack(a.model, a.run_dir, port=0, redis_appendonly=False, **overrides)
    settings = await stack.start(log=log)
    try:
        announce({"port": stack.port, "system": "gateway", "redis_pid": stack.redis.pid,
                  "redis_port": stack.redis.port, "triton_pid": stack.triton.pid,
                  "triton_url": stack.triton.grpc_url, "triton_model": stack.model.triton_model_name,
                  "model_version": stack.model.model_version,
                  "settings": {k: getattr(settings, k) for k in ("deadline_ms", "triton_timeout_ms",
                               "coalesce_max_events", "coalesce_max_wait_us", "max_in_flight")}})
        await wait_for_signal()
    finally:
        await stack.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--triton-url", default="", help="use this Triton (gRPC host:port) instead of starting one")
    ap.add_argument("--triton-model", default="", help="model name on --triton-url (default: the artifact's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="gateway setting override (gateway/settings.py field), repeatable")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
