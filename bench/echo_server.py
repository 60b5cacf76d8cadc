"""The ceiling: a do-nothing grpc.aio server for seqguard.v1.RiskScoring.

Score deserialises the request (grpc does that before the handler runs, as for the gateway)
and returns one constant, pre-built ScoreResponse: no validation, no state, no model. Whatever
latency and CPU it shows is the cost of Python gRPC itself on this machine.

    python -m bench.echo_server --port 50061
"""
from __future__ import annotations

import argparse
import asyncio
import sys

import grpc

from seqguard.gateway.proto import risk_pb2, risk_pb2_grpc

from .procs import announce, log, wait_for_signal

RESPONSE = risk_pb2.ScoreResponse(event_id="", risk=0.0, action=risk_pb2.ALLOW, model_version="echo",
                                  status=risk_pb2.OK)


class EchoService(risk_pb2_grpc.RiskScoringServicer):
    async def Score(self, request, context):
        return RESPONSE

    async def ScoreBatch(self, request, context):
        return risk_pb2.ScoreBatchResponse(results=[RESPONSE] * len(request.events))


async def serve(host: str, port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    risk_pb2_grpc.add_RiskScoringServicer_to_server(EchoService(), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise SystemExit(f"cannot bind {host}:{port}")
    await server.start()
    log(f"echo server on {host}:{bound}")
    announce({"port": bound, "system": "echo"})
    await wait_for_signal()
    await server.stop(0.5)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0: any free port (printed in the READY line)")
    a = ap.parse_args(argv)
    asyncio.run(serve(a.host, a.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
