"""Many users' LSTM steps through the step encoder, one request per wave.

A wave is the k-th step of every user at once (seqguard.encoding.lockstep_rows, the schedule the
offline replay uses too), so no user is ever stepped from a state its previous step has not yet
updated. The engine (live state) and shadow mode (a candidate's state) both step this way.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from seqguard.encoding import carried_state
from seqguard.step_contract import MAX_BATCH_ROWS

from .triton_client import EncoderUnavailable


async def step_in_waves(encoder, waves: list[np.ndarray], user_idx: np.ndarray, type_ids: np.ndarray,
                        feats: np.ndarray, h: np.ndarray, c: np.ndarray, emb: np.ndarray, surprise: np.ndarray,
                        remaining: Callable[[], float | None],
                        on_request: Callable[[float], None] | None = None) -> None:
    """Run every step through `encoder`, wave by wave, at most MAX_BATCH_ROWS rows per request.

    Step g belongs to user user_idx[g]; h, c [n_users, H] hold each user's state and move on in
    place; emb[g] and surprise[g] receive the step's outputs. `feats` is already cut to the
    encoder's width. `remaining()` is the time left for a request (None: no limit); at or below 0
    raises EncoderUnavailable before the call. On EncoderUnavailable h and c are partly stepped:
    the caller keeps its own copy to fall back on. `on_request(seconds)` hears how long each request took."""
    for wave in waves:
        for a in range(0, len(wave), MAX_BATCH_ROWS):
            rows = wave[a:a + MAX_BATCH_ROWS]
            users = user_idx[rows]
            left = remaining()
            if left is not None and left <= 0:
                raise EncoderUnavailable("deadline exceeded before the encoder call")
            t0 = time.perf_counter()
            try:
                h2, c2, e2, s2 = await encoder.step(type_ids[rows], feats[rows], h[users], c[users], timeout_s=left)
            finally:
                if on_request is not None:
                    on_request(time.perf_counter() - t0)
            h[users], c[users] = carried_state(h2), carried_state(c2)
            emb[rows], surprise[rows] = e2, s2
