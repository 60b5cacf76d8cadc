"""IsolationForest scoring without scikit-learn's per-call overhead, plus risk calibration.

sklearn's `score_samples` walks each tree in a Python-level loop and costs milliseconds for a
single row. FlatIsolationForest copies the fitted trees into padded numpy arrays and walks all
trees for all rows at once; it reproduces sklearn's arithmetic step by step (float32 inputs
compared with float64 thresholds, per-tree path lengths summed in tree order), so its scores
are bit-identical to `IsolationForest.score_samples` (tested).

Where `onnx` and `onnxruntime` are installed (the default install) the same trees are also
compiled into one ONNX `TreeEnsemble` node (ai.onnx.ml opset 5: float64 splits, float64 leaf
sums, tree order) and scored by ONNX Runtime on ONE intra-op thread: still bit-identical to
sklearn (tested at batch 1 to 50k) and several times faster than the numpy walk. One thread
because ONNX Runtime's multi-threaded tree ensemble merges per-thread partial sums, which changes
the summation order (so the scores are no longer bit-identical); big batches are split across
threads by the caller instead.

By default (`SEQGUARD_FOREST=numba`) the trees are walked by a compiled kernel instead
(`_numba_path_sums`, numba, as the featuriser kernel): each tree laid out breadth first so a
node's two children are adjacent (the step down is `child + (not x <= threshold)`, no branch), a
leaf pointing to itself through a NaN threshold, every row walked the tree's full depth, 8 rows in
flight at a time and 32 rows per pass over the trees (the rows stay in L1), a node's first child
and split feature packed in one int32. The same comparisons
(float32 inputs as float64 against float64 thresholds, NaN goes right) and the same float64 sum of
the leaves' values in tree order, per row, so the same bits as sklearn, ONNX Runtime and the numpy
walk (tested), about three times as fast as ONNX Runtime on one thread (~0.14 s instead of
~0.45 s per 65k rows and forest of 200 trees, depth 9). Rows are independent, so big batches are split over
threads (the kernel releases the GIL) with no effect on any number.
`SEQGUARD_FOREST=onnx` uses ONNX Runtime, `SEQGUARD_FOREST=numpy` the numpy walk.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import featurize_kernel  # noqa: F401  (sets numba's cache directory before numba is imported)
from numba import njit  # noqa: E402


def _average_path_length(n: float) -> float:
    """c(n) of Liu et al.: the mean path length of an unsuccessful BST search."""
    if n <= 1:
        return 0.0
    if n == 2:
        return 1.0
    return 2.0 * (np.log(n - 1.0) + np.euler_gamma) - 2.0 * (n - 1.0) / n


def by_row_blocks(fn, X: np.ndarray, rows: int = 65536) -> np.ndarray:
    """fn over consecutive blocks of X's rows, concatenated: bounds the temporaries of a row-wise
    function (a forest's score, a tail transform) over millions of rows. Rows are independent, so
    any block size gives the same result."""
    if len(X) == 0:
        return np.asarray(fn(X[:0]))
    return np.concatenate([np.asarray(fn(X[a:a + rows])) for a in range(0, len(X), rows)])


class FlatIsolationForest:
    """Arrays [n_trees, max_nodes]: children, split feature (in the full input), threshold, leaf value."""

    def __init__(self, left, right, feature, threshold, leaf_value, max_depth: int, denominator: float,
                 n_features: int):
        self.left, self.right = np.asarray(left, np.int32), np.asarray(right, np.int32)
        self.feature, self.threshold = np.asarray(feature, np.int32), np.asarray(threshold, np.float64)
        self.leaf_value = np.asarray(leaf_value, np.float64)
        self.max_depth, self.denominator, self.n_features = int(max_depth), float(denominator), int(n_features)
        self._tree_offsets = (np.arange(self.left.shape[0]) * self.left.shape[1]).astype(np.int64)
        choice = os.environ.get("SEQGUARD_FOREST", "numba")
        self._onnx = _OnnxForest.build(self) if choice == "onnx" else None
        self._numba = _NumbaForest.build(self) if choice not in ("onnx", "numpy") else None

    @property
    def backend(self) -> str:
        return "numba" if self._numba is not None else "onnx" if self._onnx is not None else "numpy"

    @classmethod
    def from_sklearn(cls, forest) -> "FlatIsolationForest":
        trees = forest.estimators_
        n_nodes = max(t.tree_.node_count for t in trees)
        T = len(trees)
        left = np.zeros((T, n_nodes), np.int32)
        right = np.zeros((T, n_nodes), np.int32)
        feature = np.zeros((T, n_nodes), np.int32)
        threshold = np.zeros((T, n_nodes), np.float64)
        leaf_value = np.zeros((T, n_nodes), np.float64)
        max_depth = 0
        for k, (est, feats) in enumerate(zip(trees, forest.estimators_features_)):
            tr = est.tree_
            n = tr.node_count
            is_leaf = tr.children_left == -1
            idx = np.arange(n)
            # a leaf points to itself, so walking past it is a no-op
            left[k, :n] = np.where(is_leaf, idx, tr.children_left)
            right[k, :n] = np.where(is_leaf, idx, tr.children_right)
            feature[k, :n] = np.where(is_leaf, 0, np.asarray(feats)[np.maximum(tr.feature, 0)])
            threshold[k, :n] = np.where(is_leaf, np.inf, tr.threshold)
            leaf_value[k, :n] = (forest._decision_path_lengths[k] + forest._average_path_length_per_tree[k] - 1.0)
            max_depth = max(max_depth, tr.max_depth)
        denominator = len(trees) * _average_path_length(forest._max_samples)
        return cls(left, right, feature, threshold, leaf_value, max_depth, denominator, forest.n_features_in_)

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        """Same as sklearn: the opposite of the anomaly score (lower = more abnormal)."""
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"expected an array of shape (n, {self.n_features}), got {X.shape}")
        Xd = X.astype(np.float32).astype(np.float64)      # sklearn compares float32 X with float64 thresholds
        n = Xd.shape[0]
        fast = self._numba if self._numba is not None else self._onnx
        if fast is not None and n:
            if self.denominator == 0:
                return -np.ones(n)
            return -(2.0 ** (-(fast.path_sums(Xd) / self.denominator)))
        return self._score_numpy(Xd)

    def _score_numpy(self, Xd: np.ndarray) -> np.ndarray:
        n = Xd.shape[0]
        T = self.left.shape[0]
        node = np.zeros((n, T), np.int64)
        flat_left, flat_right = self.left.ravel(), self.right.ravel()
        flat_feat, flat_thr = self.feature.ravel(), self.threshold.ravel()
        rows = np.arange(n)[:, None]
        off = self._tree_offsets[None, :]
        for _ in range(self.max_depth):
            g = node + off
            go_left = Xd[rows, flat_feat[g]] <= flat_thr[g]
            node = np.where(go_left, flat_left[g], flat_right[g])
        vals = self.leaf_value.ravel()[node + off]
        # summed in tree order, as sklearn accumulates (a sequential scan, not pairwise summation)
        depths = np.add.accumulate(np.ascontiguousarray(vals.T), axis=0)[-1] if T else np.zeros(n)
        if self.denominator == 0:
            return -np.ones(n)
        return -(2.0 ** (-(depths / self.denominator)))

    def to_arrays(self, prefix: str = "forest_") -> dict:
        return {prefix + k: v for k, v in dict(
            left=self.left, right=self.right, feature=self.feature, threshold=self.threshold,
            leaf_value=self.leaf_value, meta=np.array([self.max_depth, self.denominator, self.n_features], np.float64),
        ).items()}

    @classmethod
    def from_arrays(cls, arrays, prefix: str = "forest_") -> "FlatIsolationForest":
        meta = arrays[prefix + "meta"]
        return cls(arrays[prefix + "left"], arrays[prefix + "right"], arrays[prefix + "feature"],
                   arrays[prefix + "threshold"], arrays[prefix + "leaf_value"], int(meta[0]), float(meta[1]), int(meta[2]))


def _forest_threads() -> int:
    return int(os.environ.get("SEQGUARD_FOREST_THREADS", "0")) or min(4, os.cpu_count() or 1)


def _split_rows(run, Xd: np.ndarray, pool, threads: int, split_rows: int) -> np.ndarray:
    """run(Xd) over `threads` slices of the rows in `pool` when there are at least `split_rows`
    (rows are independent: the same numbers)."""
    if pool is None or Xd.shape[0] < split_rows:
        return run(Xd)
    return np.concatenate(list(pool.map(run, np.array_split(Xd, threads))))


@njit(cache=True, nogil=True)
def _walk(X, node, thr, val, shift, depth, out):
    """Per row: out = the sum over trees, in tree order, of its leaf's value (float64, from 0.0).
    node[t, i] = first child << shift | split feature; a step down is to the first child when
    x <= threshold, else to the next one (a leaf: to itself, its threshold NaN)."""
    n = X.shape[0]
    T = node.shape[0]
    mask = (1 << shift) - 1
    for r0 in range(0, n, 32):
        r1 = min(n, r0 + 32)
        for r in range(r0, r1):
            out[r] = 0.0
        for t in range(T):
            nd = node[t]
            th = thr[t]
            lv = val[t]
            r = r0
            while r + 8 <= r1:
                a = b = c = d = e = f = g = h = 0
                for _ in range(depth):
                    a = (nd[a] >> shift) + (0 if X[r, nd[a] & mask] <= th[a] else 1)
                    b = (nd[b] >> shift) + (0 if X[r + 1, nd[b] & mask] <= th[b] else 1)
                    c = (nd[c] >> shift) + (0 if X[r + 2, nd[c] & mask] <= th[c] else 1)
                    d = (nd[d] >> shift) + (0 if X[r + 3, nd[d] & mask] <= th[d] else 1)
                    e = (nd[e] >> shift) + (0 if X[r + 4, nd[e] & mask] <= th[e] else 1)
                    f = (nd[f] >> shift) + (0 if X[r + 5, nd[f] & mask] <= th[f] else 1)
                    g = (nd[g] >> shift) + (0 if X[r + 6, nd[g] & mask] <= th[g] else 1)
                    h = (nd[h] >> shift) + (0 if X[r + 7, nd[h] & mask] <= th[h] else 1)
                out[r] += lv[a]
                out[r + 1] += lv[b]
                out[r + 2] += lv[c]
                out[r + 3] += lv[d]
                out[r + 4] += lv[e]
                out[r + 5] += lv[f]
                out[r + 6] += lv[g]
                out[r + 7] += lv[h]
                r += 8
            while r < r1:
                a = 0
                for _ in range(depth):
                    a = (nd[a] >> shift) + (0 if X[r, nd[a] & mask] <= th[a] else 1)
                out[r] += lv[a]
                r += 1


class _NumbaForest:
    """The flat trees laid out breadth first for the compiled walk (see the module docstring)."""

    SPLIT_ROWS = 4096          # above this, rows are split over a thread pool (the kernel releases the GIL)

    def __init__(self, child, feat, thr, val, depth: int, n_features: int, threads: int):
        # one integer per node, first child and split feature: int32 when both fit (7 KB per
        # 300-node tree with the thresholds and values: a third faster than separate arrays)
        shift = max(1, int(np.max(feat, initial=0)).bit_length())
        wide = int(np.max(child, initial=0)) >= 1 << (30 - shift)
        if wide:
            shift = 32
        self.node = ((child.astype(np.int64) << shift) | feat).astype(np.int64 if wide else np.int32)
        self.shift, self.thr, self.val, self.depth = shift, thr, val, depth
        self._run(np.zeros((1, n_features)))      # compile (cold cache: seconds) or load the walk now, not in a request
        self.threads = threads
        self._pool = _OnnxForest.pool(threads)

    @classmethod
    def build(cls, forest: "FlatIsolationForest") -> "_NumbaForest | None":
        T, M = forest.left.shape
        child = np.zeros((T, max(M, 1)), np.int64)
        feat = np.zeros((T, max(M, 1)), np.int64)
        thr = np.full((T, max(M, 1)), np.nan)
        val = np.zeros((T, max(M, 1)), np.float64)
        for k in range(T):
            L, R = forest.left[k].tolist(), forest.right[k].tolist()
            F, TH, V = forest.feature[k].tolist(), forest.threshold[k].tolist(), forest.leaf_value[k].tolist()
            where = {0: 0}              # old node -> new node (breadth first: children adjacent)
            queue, nxt = [0], 1
            for o in queue:
                i = where[o]
                if L[o] == o:           # a leaf: "right" of child i - 1 is i itself; x <= NaN is never true
                    child[k, i], val[k, i] = i - 1, V[o]
                else:
                    child[k, i], feat[k, i], thr[k, i] = nxt, F[o], TH[o]
                    where[L[o]], where[R[o]] = nxt, nxt + 1
                    queue += [L[o], R[o]]
                    nxt += 2
        return cls(child, feat, thr, val, forest.max_depth, forest.n_features, _forest_threads())

    def _run(self, Xd: np.ndarray) -> np.ndarray:
        out = np.empty(Xd.shape[0], np.float64)
        _walk(np.ascontiguousarray(Xd, np.float64), self.node, self.thr, self.val, self.shift, self.depth, out)
        return out

    def path_sums(self, Xd: np.ndarray) -> np.ndarray:
        """Per row: the sum over trees (in tree order) of the leaf's path-length value."""
        return _split_rows(self._run, Xd, self._pool, self.threads, self.SPLIT_ROWS)


class _OnnxForest:
    """The flat trees as one ONNX TreeEnsemble node, run by ONNX Runtime on one thread per call."""

    SPLIT_ROWS = 4096          # above this, rows are split over a thread pool (ORT releases the GIL)

    _pools: dict[int, ThreadPoolExecutor] = {}     # one per thread count, shared by every forest

    def __init__(self, session, threads: int):
        self.session = session
        self.threads = threads
        self._pool = self.pool(threads)

    @classmethod
    def pool(cls, threads: int) -> ThreadPoolExecutor | None:
        """The shared pool of `threads` forest threads (None for one)."""
        if threads <= 1:
            return None
        if threads not in cls._pools:
            cls._pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="forest")
        return cls._pools[threads]

    @classmethod
    def build(cls, forest: "FlatIsolationForest") -> "_OnnxForest | None":
        try:
            import onnxruntime as ort
            from onnx import TensorProto, helper, numpy_helper
        except ImportError:
            return None
        feat, splits, true_ids, true_leaf, false_ids, false_leaf, roots, leaf_w = [], [], [], [], [], [], [], []
        for k in range(forest.left.shape[0]):
            L, R = forest.left[k], forest.right[k]
            index: dict[int, int] = {}
            interior, stack = [], [0]
            while stack:                                   # interior nodes, depth first
                o = stack.pop()
                if L[o] != o:
                    index[o] = len(feat) + len(interior)
                    interior.append(o)
                    stack += [int(R[o]), int(L[o])]
            if not interior:                               # a one-leaf tree: a split every row passes
                index[-1] = len(feat)
                interior = [-1]
            roots.append(len(feat))

            def target(o: int) -> tuple[int, int]:
                if L[o] == o:
                    leaf_w.append(float(forest.leaf_value[k, o]))
                    return len(leaf_w) - 1, 1
                return index[o], 0

            for o in interior:
                if o == -1:
                    t, leaf = target(0)
                    f, thr, (ti, tl), (fi, fl) = 0, np.inf, (t, leaf), (t, leaf)
                else:
                    f, thr = int(forest.feature[k, o]), float(forest.threshold[k, o])
                    (ti, tl), (fi, fl) = target(int(L[o])), target(int(R[o]))
                feat.append(f)
                splits.append(thr)
                true_ids.append(ti), true_leaf.append(tl), false_ids.append(fi), false_leaf.append(fl)
        node = helper.make_node(
            "TreeEnsemble", ["X"], ["Y"], domain="ai.onnx.ml", aggregate_function=1, post_transform=0,
            n_targets=1, tree_roots=roots, nodes_featureids=feat,
            nodes_splits=numpy_helper.from_array(np.array(splits, np.float64)),
            nodes_modes=numpy_helper.from_array(np.zeros(len(feat), np.uint8)),        # 0 = BRANCH_LEQ
            nodes_truenodeids=true_ids, nodes_trueleafs=true_leaf,
            nodes_falsenodeids=false_ids, nodes_falseleafs=false_leaf,
            leaf_targetids=[0] * len(leaf_w), leaf_weights=numpy_helper.from_array(np.array(leaf_w, np.float64)))
        graph = helper.make_graph(
            [node], "isolation_forest",
            [helper.make_tensor_value_info("X", TensorProto.DOUBLE, [None, forest.n_features])],
            [helper.make_tensor_value_info("Y", TensorProto.DOUBLE, [None, 1])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("ai.onnx.ml", 5)])
        model.ir_version = 10
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1          # see the module docstring: exact summation order
        so.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        except Exception:                    # an ONNX Runtime without opset-5 TreeEnsemble: numpy walk
            return None
        return cls(session, _forest_threads())

    def _run(self, Xd: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"X": Xd})[0][:, 0]

    def path_sums(self, Xd: np.ndarray) -> np.ndarray:
        """Per row: the sum over trees (in tree order) of the leaf's path-length value."""
        return _split_rows(self._run, Xd, self._pool, self.threads, self.SPLIT_ROWS)


TAIL_FLOOR = 1e-6           # 1 - risk floor of RiskCalibrator.tail


class RiskCalibrator:
    """Maps anomaly scores to risk in [0, 1]: the fraction of training events scoring lower.

    A risk of 0.99 therefore means "more anomalous than 99% of (unlabelled) training traffic",
    so a threshold at 1 - FPR flags that fraction of normal traffic, by construction.
    """

    LEVELS = np.unique(np.concatenate([np.linspace(0.0, 0.9, 91), np.linspace(0.9, 0.99, 91),
                                       np.linspace(0.99, 1.0, 201)]))

    def __init__(self, levels, quantiles):
        self.levels = np.asarray(levels, np.float64)
        self.quantiles = np.asarray(quantiles, np.float64)
        # ties in the quantiles (flat regions) take the highest level, so interpolation stays monotone;
        # computed once here, not per call (np.unique would dominate a one-row risk() call online)
        self._uq, last = np.unique(self.quantiles[::-1], return_index=True)
        self._lvls = self.levels[::-1][last]
        # the same map on a log scale of the tail, -log(1 - risk), tabulated once so scoring stays
        # pure interpolation (no per-event log: the offline and online arithmetic stay identical)
        self._tail = -np.log(np.maximum(1.0 - self._lvls, TAIL_FLOOR))

    @classmethod
    def fit(cls, anomaly: np.ndarray) -> "RiskCalibrator":
        q = np.quantile(np.asarray(anomaly, np.float64), cls.LEVELS)
        q = np.maximum.accumulate(q)
        return cls(cls.LEVELS, q)

    def tail(self, anomaly: np.ndarray) -> np.ndarray:
        """-log(1 - risk), interpolated on the level table: 0 for typical events, 4.6 at risk 0.99,
        -log(TAIL_FLOOR) = 13.8 at the top. Additive units for the session average (detector.py)."""
        return np.interp(np.asarray(anomaly, np.float64), self._uq, self._tail, left=0.0, right=self._tail[-1])

    def risk(self, anomaly: np.ndarray) -> np.ndarray:
        return np.clip(np.interp(np.asarray(anomaly, np.float64), self._uq, self._lvls, left=0.0, right=1.0),
                       0.0, 1.0)


@njit(cache=True, nogil=True)
def _tails_kernel(X, scale, shift, grid, t, dt, g1, out):
    """MarginalTails._transform_numpy element by element, the same float64 operations in the same
    order (no fastmath: no fused multiply-add). False (out unfinished) at a NaN."""
    n, d = X.shape
    top = int(grid) - 1
    for r in range(n):
        for c in range(d):
            u = X[r, c] * scale[c]
            u = u + shift[c]
            if u != u:
                return False
            if u < 0.0:                 # np.clip: max(u, 0.0) keeps -0.0, then min(., grid)
                u = 0.0
            elif u > grid:
                u = grid
            j = min(int(u), top)
            k = j + c * g1
            out[r, c] = t[k] + dt[k] * (u - float(j))
    return True


class MarginalTails:
    """Each input column -> how far into either tail of its training distribution the value lies.

    t = -log(2 * min(F, 1 - F)), F the column's mid-rank CDF among training rows: 0 at the median,
    4.6 for a 1-in-100 value (either side), the same scale for every column. An IsolationForest
    draws split points uniformly over a column's range, so on raw columns a value that is rare
    but close to the bulk (a slow bot's machine-regular gap spread, 10 events in a minute) is
    rarely cut off; on the tail scale the bulk is compressed to [0, ~2] and rarity decides.
    Rank-based: no scaling assumptions, monotone on each side of the median, robust to heavy tails.

    t is tabulated per column on a uniform grid over [min - span, max + span] of the training
    quantiles and read by linear interpolation: no search and no log per value, so one row costs
    a few microseconds and batch and single-row arithmetic are the same.
    """

    N_QUANTILES = 1024
    GRID = 3 * 1024                 # cells over [-1, 2] in span units: the table range is [0, 1]

    def __init__(self, lo, span, table):
        self.lo = np.asarray(lo, np.float64)          # [d] lowest training quantile
        self.span = np.asarray(span, np.float64)      # [d] highest - lowest (1 where constant)
        self.table = np.asarray(table, np.float64)    # [d, GRID + 1] t at the grid points
        d, g1 = self.table.shape
        self._grid = g1 - 1
        # u = grid position of a value: (x - lo) / span in [-1, 2] -> [0, GRID]
        self._scale = (self._grid / 3.0) / self.span
        self._shift = self._grid / 3.0 - self.lo * self._scale
        self._base = np.arange(d, dtype=np.int64) * g1   # offset of each column's row in the flat table
        self._t = self.table.ravel()
        self._dt = np.append(np.diff(self._t), 0.0)      # slope to the next grid point
        self.transform(np.zeros((1, d)))                 # compile or load the kernel now, not in a request

    @classmethod
    def fit(cls, X: np.ndarray) -> "MarginalTails":
        X = np.asarray(X, np.float64)
        if X.ndim != 2 or len(X) == 0:
            raise ValueError(f"MarginalTails.fit needs a non-empty [n, d] array, got {X.shape}")
        nq, G = cls.N_QUANTILES, cls.GRID
        Q = np.quantile(X, (np.arange(nq) + 0.5) / nq, axis=0)      # [nq, d]
        lo, hi = Q[0], Q[-1]
        span = np.where(hi > lo, hi - lo, 1.0)
        grid = np.linspace(-1.0, 2.0, G + 1)
        eps = 0.25 / nq                                             # floor of 2 min(F, 1 - F)
        table = np.empty((X.shape[1], G + 1))
        for c in range(X.shape[1]):
            u, first, count = np.unique(Q[:, c], return_index=True, return_counts=True)
            f = (2.0 * first + count) / (2.0 * nq)                  # mid-rank: ties share one F
            # F falls linearly to 0 / rises to 1 one span below / above the table's range
            z = np.concatenate([[-1.0], (u - lo[c]) / span[c], [2.0]])
            F = np.interp(grid, z, np.concatenate([[0.0], f, [1.0]]))
            table[c] = -np.log(np.maximum(2.0 * np.minimum(F, 1.0 - F), eps))
            # values ON a tie (a binary flag) must read their own F, not a blend with a neighbour
            on_grid = np.rint((u - lo[c]) / span[c] * (G / 3) + G / 3).astype(np.int64)
            table[c, on_grid] = -np.log(np.maximum(2.0 * np.minimum(f, 1.0 - f), eps))
        return cls(lo, span, table)

    def transform(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, np.float64)
        if X.ndim == 2 and X.shape[1] == len(self._scale) and X.shape[0]:
            out = np.empty(X.shape, np.float64)
            if _tails_kernel(np.ascontiguousarray(X), self._scale, self._shift, float(self._grid), self._t, self._dt,
                             self.table.shape[1], out):
                return out
        return self._transform_numpy(X)            # (a NaN: whatever numpy makes of it)

    def _transform_numpy(self, X: np.ndarray) -> np.ndarray:
        u = np.clip(np.asarray(X, np.float64) * self._scale + self._shift, 0.0, self._grid)
        j = np.minimum(u.astype(np.int64), self._grid - 1)
        k = j + self._base
        return self._t[k] + self._dt[k] * (u - j)

    def to_arrays(self, prefix: str) -> dict:
        return {f"{prefix}lo": self.lo, f"{prefix}span": self.span, f"{prefix}table": self.table}

    @classmethod
    def from_arrays(cls, a, prefix: str) -> "MarginalTails":
        return cls(a[f"{prefix}lo"], a[f"{prefix}span"], a[f"{prefix}table"])
