"""The step model's I/O contract: the one definition of its tensor names, dtypes and shapes.

The step model runs ONE event for a batch of users, (event_type, features, h, c) ->
(h', c', embedding, surprise). Training exports it, the repository writer and the TensorRT
builder describe it to Triton, the gateway and offline encoding call it: they all read the
names, dtypes and widths from here. Only the batch dimension (dim 0) is dynamic.

The Triton Python-backend model (model_repository/seqguard_encoder/1/model.py) keeps its own
copy, because it runs inside Triton where seqguard may not be installed; a test checks that
copy against this module.
"""
from __future__ import annotations

import numpy as np

INPUT_NAMES = ("event_type", "features", "h_in", "c_in")
OUTPUT_NAMES = ("h_out", "c_out", "embedding", "surprise")

# numpy dtype per tensor: the event type is an int64 vocabulary index, everything else float32
# (the recurrent state round-trips through Redis as float32, whatever precision an engine uses).
DTYPES = {"event_type": np.dtype(np.int64), "features": np.dtype(np.float32),
          "h_in": np.dtype(np.float32), "c_in": np.dtype(np.float32),
          "h_out": np.dtype(np.float32), "c_out": np.dtype(np.float32),
          "embedding": np.dtype(np.float32), "surprise": np.dtype(np.float32)}

# The same dtypes as Triton spells them (client InferInput; config.pbtxt adds the "TYPE_" prefix).
TRITON_DTYPES = {name: "INT64" if dtype == np.int64 else "FP32" for name, dtype in DTYPES.items()}

# ...and as ONNX Runtime reports them (InferenceSession.get_inputs()[i].type).
ORT_TYPES = {name: "tensor(int64)" if dtype == np.int64 else "tensor(float)" for name, dtype in DTYPES.items()}

# Surprise is two negative log-likelihoods per event: of its type and of its log time gap.
N_SURPRISE = 2

# The most rows one step call may carry: Triton's max_batch_size for the CPU model, so callers
# split larger batches into chunks of at most this many rows.
MAX_BATCH_ROWS = 1024


def trailing_dims(n_features: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape after the batch dimension, for a model with F features and H hidden."""
    return {"event_type": (1,), "features": (n_features,), "h_in": (hidden,), "c_in": (hidden,),
            "h_out": (hidden,), "c_out": (hidden,), "embedding": (hidden,), "surprise": (N_SURPRISE,)}


def input_arrays(type_ids, feats, h, c) -> dict[str, np.ndarray]:
    """The step's feeds, named and converted to the contract's dtypes (event_type as [B, 1])."""
    return {"event_type": np.asarray(type_ids, DTYPES["event_type"]).reshape(-1, 1),
            "features": np.ascontiguousarray(feats, DTYPES["features"]),
            "h_in": np.ascontiguousarray(h, DTYPES["h_in"]),
            "c_in": np.ascontiguousarray(c, DTYPES["c_in"])}


def random_inputs(n: int, n_features: int, hidden: int, n_event_types: int = 1, seed: int = 0) -> dict:
    """A plausible random batch of n rows (for parity checks and benchmarks): features ~ N(0, 1),
    h in (-1, 1) as an LSTM's output is, c ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    return {"event_type": rng.integers(0, max(1, n_event_types), size=(n, 1), dtype=np.int64),
            "features": rng.standard_normal((n, n_features)).astype(np.float32),
            "h_in": np.tanh(rng.standard_normal((n, hidden))).astype(np.float32),
            "c_in": rng.standard_normal((n, hidden)).astype(np.float32)}
