"""Start `python -m seqguard.gateway.server` as a real OS process (for tests that need signals or two gateways)."""
import os
import subprocess
import sys
import time

import grpc

from seqguard.services import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_gateway_process(model, redis_port, triton_url, log_path, pseudonym_key="test-key-0123456789abcdef",
                          **settings):
    """-> (Popen, port) once the gRPC port accepts connections; the caller stops the process.
    `settings`: more gateway settings, e.g. coalesce_max_concurrent=2 (-> SEQGUARD_COALESCE_MAX_CONCURRENT)."""
    port = free_port()
    env = dict(os.environ, SEQGUARD_MODEL_DIR=str(model), SEQGUARD_PORT=str(port),
               SEQGUARD_REDIS_PORT=str(redis_port), SEQGUARD_TRITON_URL=triton_url,
               SEQGUARD_PSEUDONYM_KEY=pseudonym_key, SEQGUARD_DEADLINE_MS="5000",
               SEQGUARD_TRITON_TIMEOUT_MS="5000", SEQGUARD_REDIS_TIMEOUT_MS="1000")
    env.update({f"SEQGUARD_{k.upper()}": str(v) for k, v in settings.items()})     # the caller's win
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "seqguard.gateway.server"], cwd=ROOT, env=env, stdout=log, stderr=log)
    log.close()   # the child holds its own descriptor
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                grpc.channel_ready_future(ch).result(timeout=1)
            return proc, port
        except grpc.FutureTimeoutError:
            assert proc.poll() is None, open(log_path).read()
    proc.kill()
    raise RuntimeError("gateway did not start")
