"""Redis memory per active user after replaying a log through the gateway's scoring engine.

Starts a real Redis and a real Triton, replays the events of the first N users of a log (in
time order, batches of --batch) through gateway.engine.ScoringEngine, then reports
MEMORY USAGE per key family (user state, entity contexts, idempotency entries) and the
INFO used_memory delta. Idempotency entries (sg:e:) live for dedupe_ttl_s per EVENT, so they
are reported per event in the window, not per user.

    .venv/bin/python -m bench.redis_memory --model runs/m20k_p64 --log data/test5k_s4.jsonl --users 1000
"""
from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time

import numpy as np


def _families(r) -> dict:
    out: dict[str, list] = {}
    for k in r.scan_iter(count=1000):
        fam = k.decode()[:5]
        out.setdefault(fam, []).append(r.memory_usage(k, samples=0) or 0)
    return out


async def _replay(args, redis_port: int, triton_url: str) -> dict:
    from seqguard.gateway.engine import ScoringEngine
    from seqguard.gateway.state import Pseudonymizer, RedisStateStore
    from seqguard.gateway.triton_client import TritonStepClient
    import redis.asyncio as aioredis
    from seqguard.artifact import ModelArtifact
    from seqguard.featurizer import TokenHasher
    from seqguard.schema import read_events

    key = b"bench-pseudonym-key-0123456789"
    art = ModelArtifact.load(args.model, hasher=TokenHasher(key))
    events = list(read_events(args.log))
    users = list(dict.fromkeys(e.user_id for e in events))[:args.users]
    keep = set(users)
    events = sorted((e for e in events if e.user_id in keep), key=lambda e: e.ts)
    client = aioredis.Redis(port=redis_port)
    store = RedisStateStore(client, Pseudonymizer(key), art.hidden, ttl_s=7 * 86400,
                            ring_size=args.ring, dedupe_ttl_s=args.dedupe_ttl, rebuild_steps=args.rebuild_steps)
    enc = TritonStepClient(triton_url, "seqguard_encoder", art.triton_model_version, 30_000)
    eng = ScoringEngine(art, store, enc)
    t0 = time.perf_counter()
    for a in range(0, len(events), args.batch):
        res = await eng.score(events[a:a + args.batch], explain_reasons=True)
        assert all(r.status == "OK" for r in res), res[0].detail
    dt = time.perf_counter() - t0
    await enc.close()
    await store.close()
    return {"events": len(events), "users": len(users), "replay_s": dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="runs/m20k_p64")
    ap.add_argument("--log", default="data/test5k_s4.jsonl")
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--ring", type=int, default=None, help="ring size (default: the gateway setting)")
    ap.add_argument("--rebuild-steps", type=int, default=None,
                    help="ring entries kept with features (default: the gateway setting)")
    ap.add_argument("--dedupe-ttl", type=int, default=600)
    ap.add_argument("--json", help="write the numbers here too")
    args = ap.parse_args()
    from seqguard.gateway.settings import Settings
    from seqguard.services import RedisServer, TritonServer, find_tritonserver, prepare_backend_dir
    if args.ring is None:
        args.ring = Settings().recent_events
    if args.rebuild_steps is None:
        args.rebuild_steps = Settings().rebuild_steps
    with tempfile.TemporaryDirectory() as tmp:
        inst = find_tritonserver()
        with RedisServer(run_dir=f"{tmp}/redis") as rs, TritonServer(
                f"{args.model}/model_repository", models=("seqguard_encoder",), install=inst,
                backend_dir=prepare_backend_dir(f"{tmp}/be", inst), run_dir=f"{tmp}/triton") as ts:
            r = rs.client()
            r.flushall()
            base = int(r.info("memory")["used_memory"])
            info = asyncio.run(_replay(args, rs.port, ts.grpc_url))
            used = int(r.info("memory")["used_memory"]) - base
            fam = _families(r)
            enc = {}
            for k in r.scan_iter(match="sg:u:*", count=1000):
                enc[r.object("encoding", k).decode()] = enc.get(r.object("encoding", k).decode(), 0) + 1
            sizes = []
            for k in r.scan_iter(match="sg:u:*", count=1000):
                if r.type(k) == b"hash":       # format 1 (before this change): one field per part
                    sizes.append({f.decode(): len(v) for f, v in r.hgetall(k).items()})
                else:                          # format 2: one string; split it to report its parts
                    from seqguard.gateway.codec import pack_ring, unpack_user
                    raw = r.get(k)
                    st = unpack_user(k.decode(), raw)
                    ring = len(pack_ring(st.ring, len(st.ring)))
                    sizes.append({"total": len(raw), "h+c": 8 * len(st.h), "ctx": len(st.ctx.to_bytes()),
                                  "ring": ring, "ring_feature_rows": sum(len(e.feat) for e in st.ring)})
            fields = {f: float(np.mean([d.get(f, 0) for d in sizes])) for f in sizes[0]}
    U, E = info["users"], info["events"]
    s = lambda f: int(np.sum(fam.get(f, [0])))  # noqa: E731
    out = {**info, "ring": args.ring, "dedupe_ttl_s": args.dedupe_ttl,
           "user_key_bytes_per_user": s("sg:u:") / U,
           "entity_bytes_per_user": (s("sg:d:") + s("sg:i:") + s("sg:p:")) / U,
           "entity_keys": sum(len(fam.get(f, [])) for f in ("sg:d:", "sg:i:", "sg:p:")),
           "dedupe_bytes_per_event": s("sg:e:") / max(1, len(fam.get("sg:e:", []))),
           "dedupe_entries": len(fam.get("sg:e:", [])),
           "used_memory_delta_per_user": used / U,
           "used_memory_minus_dedupe_per_user": (used - s("sg:e:")) / U,
           "user_hash_encoding": enc, "mean_user_field_bytes": fields}
    out["state_bytes_per_user"] = out["user_key_bytes_per_user"] + out["entity_bytes_per_user"]
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
