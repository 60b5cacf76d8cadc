"""IsolationForest scoring without scikit-learn's per-call overhead, plus risk calibration.

sklearn's `score_samples` walks each tree in a Python-level loop and costs milliseconds for a
single row. FlatIsolationForest copies the fitted trees into padded numpy arrays and walks all
trees for all rows at once; it reproduces sklearn's arithmetic step by step (float32 inputs
compared with float64 thresholds, per-tree path lengths summed in tree order), so its scores
are bit-identical to `IsolationForest.score_samples` (tested).
"""
from __future__ import annotations

import numpy as np


def _average_path_length(n: float) -> float:
    """c(n) of Liu et al.: the mean path length of an unsuccessful BST search."""
    if n <= 1:
        return 0.0
    if n == 2:
        return 1.0
    return 2.0 * (np.log(n - 1.0) + np.euler_gamma) - 2.0 * (n - 1.0) / n


class FlatIsolationForest:
    """Arrays [n_trees, max_nodes]: children, split feature (in the full input), threshold, leaf value."""

    def __init__(self, left, right, feature, threshold, leaf_value, max_depth: int, denominator: float,
                 n_features: int):
        self.left, self.right = np.asarray(left, np.int32), np.asarray(right, np.int32)
        self.feature, self.threshold = np.asarray(feature, np.int32), np.asarray(threshold, np.float64)
        self.leaf_value = np.asarray(leaf_value, np.float64)
        self.max_depth, self.denominator, self.n_features = int(max_depth), float(denominator), int(n_features)
        self._tree_offsets = (np.arange(self.left.shape[0]) * self.left.shape[1]).astype(np.int64)

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

    @classmethod
    def fit(cls, anomaly: np.ndarray) -> "RiskCalibrator":
        q = np.quantile(np.asarray(anomaly, np.float64), cls.LEVELS)
        q = np.maximum.accumulate(q)
        return cls(cls.LEVELS, q)

    def risk(self, anomaly: np.ndarray) -> np.ndarray:
        q, lv = self.quantiles, self.levels
        # ties in the quantiles (flat regions) take the highest level, so interpolation stays monotone
        uq, last = np.unique(q[::-1], return_index=True)
        lvls = lv[::-1][last]
        return np.clip(np.interp(np.asarray(anomaly, np.float64), uq, lvls, left=0.0, right=1.0), 0.0, 1.0)
