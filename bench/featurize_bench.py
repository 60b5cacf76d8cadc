"""Featuriser alone, events per CPU-second: the compiled kernel offline (`featurize_log`: tokens +
kernel over a whole log) and the gateway's batch call (`Featurizer.featurize_batch` on context
objects decoded from Redis bytes and encoded back, per batch size), against the per-event Python
featuriser it replaced (tests/reference_featurizer.py) when `--reference` is given.

    .venv/bin/python bench/featurize_bench.py --log runs/log.jsonl [--reference] [--events 200000]
"""
from __future__ import annotations

import argparse
import itertools
import os
import time

from seqguard.featurizer import (EntityContext, Featurizer, TokenHasher, UserContext, Vocabulary,
                                 featurize_log, ip_prefix)
from seqguard.schema import read_events


def _load_reference():
    """tests/reference_featurizer.py (the per-event Python oracle), loaded by file path: it is a
    test helper, not part of the installed package."""
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "reference_featurizer.py")
    spec = importlib.util.spec_from_file_location("reference_featurizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def gateway_batches(fz: Featurizer, events, batch: int, old=None) -> None:
    """As the gateway would: per batch, contexts from bytes, featurise, contexts to bytes. With `old`
    (the reference module): its contexts and one featurize call per event, as the gateway does today."""
    UC, EC = (old.UserContext, old.EntityContext) if old else (UserContext, EntityContext)
    old_fz = old.Featurizer(fz.vocab, fz.hasher) if old else None
    users: dict = {}
    ents: dict = {}
    for a in range(0, len(events), batch):
        evs = events[a:a + batch]
        lu = {e.user_id: UC.from_bytes(users[e.user_id]) if e.user_id in users else UC() for e in evs}
        keys = [(("d", e.device_id) if e.device_id else None, ("i", e.ip) if e.ip else None,
                 ("p", ip_prefix(e.ip)) if e.ip else None) for e in evs]
        le = {k: EC.from_bytes(ents[k]) if k in ents else EC() for ks in keys for k in ks if k}
        if old_fz:
            for e, ks in zip(evs, keys):
                old_fz.featurize(old_fz.tokens(e), lu[e.user_id], *(le.get(k) for k in ks))
        else:
            fz.featurize_batch(evs, [lu[e.user_id] for e in evs], [tuple(le.get(k) for k in ks) for ks in keys])
        users.update((k, v.to_bytes()) for k, v in lu.items())
        ents.update((k, v.to_bytes()) for k, v in le.items())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--log", required=True)
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--reference", action="store_true", help="also time the per-event Python featuriser")
    a = p.parse_args()
    events = sorted(itertools.islice(read_events(a.log), a.events), key=lambda e: e.ts)
    vocab = Vocabulary.learn(e.event_type for e in events)
    fz = Featurizer(vocab, TokenHasher())
    featurize_log(fz, events[:1000])                                  # load the compiled kernel
    n = len(events)
    rows = [("kernel, featurize_log (whole log)", cpu(lambda: featurize_log(fz, events)))]
    for b in (1, 16, 64, 512):
        k = min(n, 20_000 * b if b < 64 else n)
        rows.append((f"kernel, featurize_batch of {b} (+ context bytes)",
                     cpu(lambda: gateway_batches(fz, events[:k], b)) * n / k))
    if a.reference:
        ref = _load_reference()
        rows.append(("Python reference, featurize_log", cpu(lambda: ref.featurize_log(ref.Featurizer(vocab, TokenHasher()),
                                                                                      events))))
        for b in (1, 64):
            k = min(n, 20_000 * b if b < 64 else n)
            rows.append((f"Python reference, per event, batches of {b} (+ bytes)",
                         cpu(lambda: gateway_batches(fz, events[:k], b, old=ref)) * n / k))
    print(f"{n} events of {os.path.basename(a.log)}")
    for name, s in rows:
        print(f"  {name:52s} {n / s:>10,.0f} events/CPU-s  ({1e6 * s / n:.1f} us/event)")


if __name__ == "__main__":
    main()
