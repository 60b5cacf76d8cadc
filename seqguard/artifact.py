"""The model artifact directory written by `seqguard train` and read by every scorer.

    DIR/metadata.json          versions, schema hash, featuriser spec, thresholds, training stats
    DIR/encoder.pt             torch checkpoint (config + weights), for retraining and parity checks
    DIR/model.onnx             the step model (the graph Triton serves)
    DIR/detector.npz           PCA + flattened IsolationForest + risk calibration (numpy only)
    DIR/isolation_forest.joblib  the fitted scikit-learn estimators (one per type group), kept for audit
    DIR/isolation_forest_tail_scaled.joblib  their twins on tail-scaled inputs (absent with --no-tail-forest)
    DIR/model_repository/      a Triton model repository holding this model's step encoder

Loading checks that the featuriser spec in the artifact hashes to what this code computes,
so a gateway never serves a model with a featuriser it was not trained with.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .detector import Detector, action_thresholds
from .featurizer import Featurizer, TokenHasher

FORMAT = "seqguard-model"
FORMAT_VERSION = 2
METADATA = "metadata.json"
ONNX_FILE = "model.onnx"
DETECTOR_FILE = "detector.npz"


class ArtifactError(RuntimeError):
    """The directory is not a usable seqguard model (missing files, version or schema mismatch)."""


@dataclass
class ModelArtifact:
    path: Path
    metadata: dict
    featurizer: Featurizer
    detector: Detector

    @property
    def model_version(self) -> str:
        return self.metadata["model_version"]

    @property
    def schema_hash(self) -> str:
        return self.metadata["schema_hash"]

    @property
    def hidden(self) -> int:
        return int(self.metadata["encoder"]["hidden"])

    @property
    def encoder_features(self) -> int:
        """How many of the featuriser's columns the step model reads (the first ones)."""
        return int(self.metadata["encoder"]["n_features"])

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    @property
    def repository_dir(self) -> Path:
        return self.path / "model_repository"

    @property
    def triton_model_name(self) -> str:
        return self.metadata["triton"]["model_name"]

    @property
    def triton_model_version(self) -> str:
        return str(self.metadata["triton"]["model_version"])

    @classmethod
    def load(cls, path, hasher: TokenHasher | None = None, action_fpr: dict | None = None) -> "ModelArtifact":
        path = Path(path)
        meta_path = path / METADATA
        if not meta_path.is_file():
            raise ArtifactError(f"{path} is not a seqguard model directory (no {METADATA}); "
                                "create one with `seqguard train --events ... --out DIR`")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"{meta_path}: format {meta.get('format')} v{meta.get('format_version')}, "
                                f"this code reads {FORMAT} v{FORMAT_VERSION}")
        try:
            featurizer = Featurizer.from_spec(meta["featurizer"], hasher)
        except ValueError as e:
            raise ArtifactError(f"{path}: {e}") from None
        if featurizer.schema_hash() != meta["schema_hash"]:
            raise ArtifactError(f"{path}: featuriser schema hash {meta['schema_hash']} does not match this "
                                f"code's {featurizer.schema_hash()}; retrain or run the matching seqguard version")
        for f in (ONNX_FILE, DETECTOR_FILE):
            if not (path / f).is_file():
                raise ArtifactError(f"{path}: missing {f}")
        with np.load(path / DETECTOR_FILE) as arrays:
            fpr = {**meta.get("action_fpr", {}), **(action_fpr or {})}
            try:
                detector = Detector.from_arrays(dict(arrays), action_thresholds(fpr))
            except KeyError as e:
                raise ArtifactError(f"{path}: {DETECTOR_FILE} lacks {e}: retrain the model") from None
        # the compiled carried-state rounding (seqguard.encoding) too: with a cold numba cache the
        # compile takes seconds, here instead of inside a first request (the forest and tail
        # kernels are loaded by the detector's constructors)
        from .encoding import carried_state
        carried_state(np.zeros((1, 1), np.float32))
        return cls(path, meta, featurizer, detector)


def save_metadata(path, meta: dict) -> None:
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
    tmp = Path(path) / (METADATA + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, Path(path) / METADATA)
