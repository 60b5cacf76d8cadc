"""Triton model repository for the seqguard step encoder.

Layout written by :func:`write_model_repository`::

    repo_dir/
      seqguard_encoder/
        config.pbtxt          # rendered by render_config()
        <version>/
          model.py            # copy of the committed model_repository/seqguard_encoder/1/model.py
          model.onnx          # the exported step model

The committed ``model_repository/seqguard_encoder/config.pbtxt`` is ``render_config()`` with
its defaults (a test checks this), so the template lives in one place only.
"""
from __future__ import annotations

import importlib.resources
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from seqguard.step_contract import (INPUT_NAMES, MAX_BATCH_ROWS, ORT_TYPES, OUTPUT_NAMES, TRITON_DTYPES,
                                    trailing_dims)

# The committed Python-backend model, shipped as package data (seqguard/triton_backend/model.py
# links to model_repository/seqguard_encoder/1/model.py), so an installed gateway finds it.
COMMITTED_MODEL_PY = Path(str(importlib.resources.files("seqguard") / "triton_backend" / "model.py"))

DEFAULT_MODEL_NAME = "seqguard_encoder"
DEFAULT_PREFERRED_BATCH_SIZES = (16, 64, 256)
# Versions Triton keeps loaded (the newest N version directories): the live one and the one before
# it (or a shadow candidate after it). Gateways pin an explicit version, so publishing <n+1> never
# takes away the version a gateway still serves; see docs/operations.md "Version policy".
DEFAULT_KEEP_VERSIONS = 2

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")

# What each tensor is, written above it in the CPU model's config.pbtxt (operators read that file).
_CPU_COMMENTS = {
    "event_type": "Event type id (vocabulary index), one per row.",
    "features": "Featurised event (F = {n_features}).",
    "h_in": "LSTM state before this event (H = {hidden}); zeros for a new user.",
    "h_out": "LSTM state after this event: the gateway stores it per user.",
    "embedding": "Sequence embedding for the downstream anomaly detector.",
    "surprise": "Next-event surprise scores (2 values per row).",
}


def tensor_blocks(names: Sequence[str], dims: dict, comments: dict | None = None,
                  data_types: dict | None = None, **comment_fields) -> str:
    """The config.pbtxt entries of an input [...] or output [...] list, from the step contract.

    ``data_types`` overrides a tensor's Triton type (a TensorRT plan may take INT32 event types)."""
    blocks = []
    for name in names:
        comment = (comments or {}).get(name)
        head = f"    # {comment.format(**comment_fields)}\n" if comment else ""
        data_type = (data_types or {}).get(name, f"TYPE_{TRITON_DTYPES[name]}")
        shape = ", ".join(str(d) for d in dims[name])
        blocks.append(f"  {{\n{head}    name: \"{name}\"\n    data_type: {data_type}\n    dims: [ {shape} ]\n  }}")
    return ",\n".join(blocks)


def render_config(*, model_name: str = DEFAULT_MODEL_NAME, n_features: int = 40,
                  hidden: int = 128, max_batch_size: int = MAX_BATCH_ROWS, instances: int = 1,
                  max_queue_delay_us: int = 0, ort_threads: int = 1,
                  preferred_batch_sizes: Sequence[int] = DEFAULT_PREFERRED_BATCH_SIZES,
                  keep_versions: int = DEFAULT_KEEP_VERSIONS) -> str:
    """The model's config.pbtxt text (the single template for every repository we write)."""
    for label, value in (("n_features", n_features), ("hidden", hidden),
                         ("max_batch_size", max_batch_size), ("instances", instances),
                         ("ort_threads", ort_threads), ("keep_versions", keep_versions)):
        if int(value) < 1:
            raise ValueError(f"{label} must be >= 1, got {value}")
    if max_queue_delay_us < 0:
        raise ValueError(f"max_queue_delay_us must be >= 0, got {max_queue_delay_us}")
    if not _NAME_RE.match(model_name):
        raise ValueError(f"bad model name {model_name!r}")
    preferred = sorted({int(b) for b in preferred_batch_sizes if 0 < int(b) <= max_batch_size})
    preferred_txt = ", ".join(str(b) for b in preferred)
    dims = trailing_dims(n_features, hidden)
    return f"""\
# seqguard step encoder: one LSTM step per event, served by ONNX Runtime inside Triton's
# Python backend (CPU only). Rendered by seqguard.triton_repo.render_config(); do not edit
# by hand, re-render instead (tests check the committed copy against the template).
name: "{model_name}"
# Python backend: the wheel-bundled tritonserver has no onnxruntime backend, and model.py
# runs ONNX Runtime itself (one ORT run per merged batch).
backend: "python"
# Requests carry the batch as dim 0; the dynamic batcher merges requests up to this many rows.
max_batch_size: {max_batch_size}

# Shapes below exclude the batch dim. Only the batch dim is dynamic.
input [
{tensor_blocks(INPUT_NAMES, dims, _CPU_COMMENTS, n_features=n_features, hidden=hidden)}
]
output [
{tensor_blocks(OUTPUT_NAMES, dims, _CPU_COMMENTS, n_features=n_features, hidden=hidden)}
]

# Merge concurrent single-event requests into one ORT run. The preferred sizes let the
# batcher cut a batch early once that many rows are waiting. Queue delay {max_queue_delay_us} us: the
# gateway already coalesces concurrent calls into one request, so waiting here only adds latency;
# raise it for many gateways sharing one Triton. (The batcher only merges requests whose non-batch
# shapes are identical, which holds here: every request has the same F and H.)
dynamic_batching {{
  preferred_batch_size: [ {preferred_txt} ]
  max_queue_delay_microseconds: {max_queue_delay_us}
}}

# CPU instances; each is one Python stub process holding its own ORT session. More
# instances only help with spare cores (the Python backend runs one batch at a time per
# instance).
instance_group [
  {{
    count: {instances}
    kind: KIND_CPU
  }}
]

# Serve the newest {keep_versions} version directories. Gateways ask for an explicit version, so when
# <n+1>/ appears the gateways still on <n> keep being served until they switch (hot reload or
# rollout), and rolling back to <n> needs no load. Older directories are unloaded (and pruned by
# the export, seqguard.triton_repo.prune_versions).
version_policy: {{ latest: {{ num_versions: {keep_versions} }} }}

parameters [
  {{
    # ONNX Runtime intra-op threads per instance; 1 keeps instances from fighting over cores
    # (scale with instance_group count instead).
    key: "ort_intra_op_threads"
    value: {{ string_value: "{ort_threads}" }}
  }}
]
"""


def next_version(repo_dir: str | os.PathLike, model_name: str = DEFAULT_MODEL_NAME) -> int:
    """1 + the highest numeric version directory of ``repo_dir/model_name`` (1 if none)."""
    model_dir = Path(repo_dir) / model_name
    versions = [int(p.name) for p in model_dir.iterdir()
                if p.is_dir() and p.name.isdigit()] if model_dir.is_dir() else []
    return max(versions, default=0) + 1


def onnx_dims(onnx_path: str | os.PathLike) -> tuple[int, int]:
    """(F, H) read from the step model's inputs ``features`` [B,F] and ``h_in`` [B,H]."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    try:
        f, h = shapes["features"][1], shapes["h_in"][1]
    except (KeyError, IndexError):
        raise ValueError(f"{onnx_path}: not a seqguard step model (inputs {sorted(shapes)}, "
                         f"expected {list(INPUT_NAMES)})") from None
    if not isinstance(f, int) or not isinstance(h, int):
        raise ValueError(f"{onnx_path}: features/h_in need static trailing dims, got {f}, {h}")
    return f, h



def _check_onnx(onnx_path: Path, n_features: int, hidden: int) -> None:
    """Fail early (with names and shapes) if the ONNX file does not honour the contract."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    dims_by_name = trailing_dims(n_features, hidden)
    problems = []
    for kind, names, got in (("input", INPUT_NAMES, sess.get_inputs()),
                             ("output", OUTPUT_NAMES, sess.get_outputs())):
        got = {a.name: a for a in got}
        for name in names:
            dtype, dims = ORT_TYPES[name], list(dims_by_name[name])
            arg = got.get(name)
            if arg is None:
                problems.append(f"missing {kind} '{name}'")
                continue
            tail = list(arg.shape[1:])
            if arg.type != dtype or len(arg.shape) != 1 + len(dims) or any(
                    isinstance(g, int) and g != w for g, w in zip(tail, dims)):
                problems.append(f"{kind} '{name}' is {arg.type} {list(arg.shape)}, "
                                f"expected {dtype} ['batch', {', '.join(map(str, dims))}]")
    if problems:
        raise ValueError(f"{onnx_path} does not match the step-model contract "
                         f"(F={n_features}, H={hidden}): " + "; ".join(problems))


def write_model_repository(repo_dir: str | os.PathLike, onnx_path: str | os.PathLike, *,
                           model_name: str = DEFAULT_MODEL_NAME, version: int = 1,
                           n_features: int = 40, hidden: int = 128,
                           max_batch_size: int = MAX_BATCH_ROWS, instances: int = 1,
                           max_queue_delay_us: int = 0, ort_threads: int = 1,
                           preferred_batch_sizes: Sequence[int] = DEFAULT_PREFERRED_BATCH_SIZES,
                           keep_versions: int = DEFAULT_KEEP_VERSIONS,
                           model_py: str | os.PathLike = COMMITTED_MODEL_PY,
                           validate: bool = True) -> Path:
    """Write (or update) ``repo_dir/model_name`` for Triton and return ``repo_dir``.

    ``repo_dir`` is what ``tritonserver --model-repository`` takes. The version directory is
    staged under a hidden name and renamed into place, so a polling server never sees a
    half-copied model; an existing directory of the same version is replaced. With
    ``validate`` the ONNX file's I/O is checked against the contract (F, H) first.
    """
    repo_dir = Path(repo_dir)
    onnx_path = Path(onnx_path)
    model_py = Path(model_py)
    if version < 1:
        raise ValueError(f"version must be >= 1, got {version}")
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {onnx_path}")
    if not model_py.is_file():
        raise FileNotFoundError(f"Triton model.py not found: {model_py}")
    config = render_config(model_name=model_name, n_features=n_features, hidden=hidden,
                           max_batch_size=max_batch_size, instances=instances,
                           max_queue_delay_us=max_queue_delay_us, ort_threads=ort_threads,
                           preferred_batch_sizes=preferred_batch_sizes, keep_versions=keep_versions)
    if validate:
        _check_onnx(onnx_path, n_features, hidden)

    publish_version(repo_dir / model_name, version, {"model.py": model_py, "model.onnx": onnx_path}, config)
    return repo_dir


def versions(model_dir: str | os.PathLike) -> list[int]:
    """The numeric version directories of one model entry, ascending."""
    model_dir = Path(model_dir)
    return sorted(int(p.name) for p in model_dir.iterdir()
                  if p.is_dir() and p.name.isdigit()) if model_dir.is_dir() else []


def prune_versions(model_dir: str | os.PathLike, keep: int = DEFAULT_KEEP_VERSIONS) -> list[int]:
    """Delete the version directories older than the newest ``keep``; returns the removed versions.

    With a ``latest: { num_versions: keep }`` policy Triton never serves those directories (it
    unloads a version as soon as ``keep`` newer ones exist), so removing them only frees disk;
    rolling back further than one version means re-exporting that artifact as a new version.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    old = versions(model_dir)[:-keep]
    for v in old:
        shutil.rmtree(Path(model_dir) / str(v))
    return old


def publish_version(model_dir: Path, version: int, files: dict, config: str, move: bool = False) -> Path:
    """Put `files` ({name in the version dir: source path}) into model_dir/<version>/ and write config.pbtxt.

    The version directory is built under a hidden name and renamed into place, so a polling
    Triton never sees a half-copied model; an existing directory of that version is replaced.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=model_dir))
    try:
        staging.chmod(0o755)
        for name, src in files.items():
            (shutil.move if move else shutil.copyfile)(str(src), str(staging / name))
        final = model_dir / str(version)
        if final.exists():
            shutil.rmtree(final)
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    tmp_cfg = model_dir / f".config.pbtxt.{os.getpid()}"
    tmp_cfg.write_text(config)
    os.replace(tmp_cfg, model_dir / "config.pbtxt")
    return model_dir
