"""Running the exported step model: locally with ONNX Runtime, over many users at once.

Batch scoring and training's post-processing run the very graph Triton serves (model.onnx),
one step per event, batched across users. ONNX Runtime's CPU kernels give each row the same
bits whatever the batch composition, so an offline embedding equals the online one exactly.
"""
from __future__ import annotations

import numpy as np

from seqguard import featurize_kernel  # noqa: F401  (sets numba's cache directory before numba is imported)
from numba import njit  # noqa: E402
from seqguard.step_contract import OUTPUT_NAMES, input_arrays

# A user's (h, c) is kept between steps as float16: half the bytes of the largest part of a user's
# record in Redis. Every path that carries a state from one step to the next (offline replay, batch
# scoring, the gateway) rounds it with carried_state(), so the online state read back from Redis and
# the offline one are the same numbers; the step itself still computes in float32.
STATE_DTYPE = np.float16
_STATE_MAX = float(np.finfo(STATE_DTYPE).max)


def carried_state(x: np.ndarray) -> np.ndarray:
    """h or c as it is carried to the next step: rounded to float16 (clipped to its range, so an
    LSTM cell that grew past it stays finite), returned as float32 for the next step's input.

    float32 input is rounded by a compiled kernel (`_round_to_half`): numpy converts to and from
    float16 in software, element by element, a fifth of offline encoding's time. The kernel gives
    `_carried_state_numpy`'s bits (tests/test_encoding_state.py); a NaN goes the numpy way."""
    if isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim >= 1:
        src = np.ascontiguousarray(x).reshape(-1)
        out = np.empty(src.shape, np.float32)
        if _round_to_half(src, src.view(np.uint32), out, out.view(np.uint32)):
            return out.reshape(x.shape)
    return _carried_state_numpy(x)


def _carried_state_numpy(x: np.ndarray) -> np.ndarray:
    return np.clip(x, -_STATE_MAX, _STATE_MAX).astype(STATE_DTYPE).astype(np.float32)


@njit(cache=True, nogil=True)
def _round_to_half(src, src_bits, dst, dst_bits):
    """clip(x, -65504, 65504) rounded to float16 (IEEE round to nearest, ties to even, as numpy's
    conversion) and back to float32, element by element (src, dst: float32 arrays and their uint32
    views). False (dst unfinished) at a NaN."""
    for i in range(src.shape[0]):
        b = src_bits[i]
        mag = b & 0x7FFFFFFF
        if mag > 0x7F800000:                            # NaN
            return False
        if mag >= 0x477FE000:                           # |x| >= 65504 (inf too): clipped to +-65504
            dst_bits[i] = (b & 0x80000000) | 0x477FE000
        elif mag >= 0x38800000:                         # |x| >= 2**-14: a normal float16, 10 fraction bits
            dst_bits[i] = (b & 0x80000000) | ((mag + 0x0FFF + ((mag >> 13) & 1)) & 0xFFFFE000)
        else:                                           # the float16 subnormal range: a multiple of 2**-24
            q = np.rint(abs(np.float64(src[i])) * 16777216.0) / 16777216.0
            dst[i] = np.float32(-q if b & 0x80000000 else q)
    return True


class OrtStep:
    """(type_ids [B], features [B,F], h [B,H], c [B,H]) -> (h', c', embedding, surprise).

    Feature rows may be wider than the graph's F (the featuriser's detector-only features come
    after the encoder's, seqguard.featurizer.N_ENCODER_FEATURES): the step reads the first F."""

    def __init__(self, onnx_path: str, threads: int = 0):
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        shapes = {i.name: i.shape for i in self.session.get_inputs()}
        self.hidden = int(shapes["h_in"][1])
        self.n_features = int(shapes["features"][1])

    def __call__(self, type_ids, feats, h, c):
        feeds = input_arrays(type_ids, np.asarray(feats, np.float32)[:, :self.n_features], h, c)
        return tuple(self.session.run(list(OUTPUT_NAMES), feeds))


def lockstep_rows(user_idx: np.ndarray, n_users: int):
    """Rows (each user's rows in their order) grouped by position within the user: first every
    user's 1st row, then every 2nd, ... Each group ("wave") has one row per user, in row order, so
    per-user state can be advanced for the whole group at once. The one wave schedule: the offline
    replay, the gateway's engine and its shadow mode all step users this way."""
    user_idx = np.asarray(user_idx, np.int64)
    n = len(user_idx)
    if n == 0:
        return
    by_user = np.argsort(user_idx, kind="stable")
    counts = np.bincount(user_idx, minlength=n_users)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(n, np.int64)
    rank[by_user] = np.arange(n) - np.repeat(starts, counts)
    by_rank = np.argsort(rank, kind="stable")
    pos = 0
    for n_k in np.bincount(rank):
        yield by_rank[pos:pos + n_k]
        pos += n_k


def encode_sequences(step, user_idx: np.ndarray, type_ids: np.ndarray, feats: np.ndarray, n_users: int,
                     reduce=None, max_batch: int = 8192, progress: bool = False,
                     h0: np.ndarray | None = None, c0: np.ndarray | None = None):
    """Run every user's events through the step model in order, all users in lock-step.

    Events are given in replay order (a user's events appear in their own order). Returns
    (reduce(embedding) per event, surprise per event [N,2] float32, final h, final c).
    `reduce` maps an embedding batch to what the caller keeps (default: all of it), so
    millions of events never hold millions of 128-float embeddings. h0, c0 [n_users, H]: the
    users' carried states to start from (default zeros: new users); they are not modified.
    """
    N = len(user_idx)
    H = step.hidden
    user_idx = np.asarray(user_idx, np.int64)
    h = np.zeros((n_users, H), np.float32) if h0 is None else np.array(h0, np.float32)
    c = np.zeros((n_users, H), np.float32) if c0 is None else np.array(c0, np.float32)
    surprise = np.empty((N, 2), np.float32)
    kept = None
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=N, desc="encode", unit="ev", mininterval=1.0, leave=False)
    for rows_k in lockstep_rows(user_idx, n_users):
        for a in range(0, len(rows_k), max_batch):
            rows = rows_k[a:a + max_batch]
            users = user_idx[rows]
            h2, c2, emb, sur = step(type_ids[rows], feats[rows], h[users], c[users])
            h[users], c[users] = carried_state(h2), carried_state(c2)
            surprise[rows] = sur
            out = emb if reduce is None else reduce(emb)
            if kept is None:
                kept = np.empty((N, out.shape[1]), out.dtype)
            kept[rows] = out
            if bar is not None:
                bar.update(len(rows))
    if bar is not None:
        bar.close()
    if kept is None:
        kept = np.empty((0, H), np.float32)
    return kept, surprise, h, c
