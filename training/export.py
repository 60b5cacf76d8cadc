"""`seqguard export`: put a trained step encoder into a Triton model repository.

Two entries, one contract (seqguard.step_contract):

* ``seqguard_encoder``      ONNX Runtime inside Triton's Python backend, CPU (always written;
                            :func:`export_onnx_repository`, via ``seqguard.triton_repo``).
* ``seqguard_encoder_trt``  a TensorRT plan, GPU (``--tensorrt``; built, checked and published
                            by ``seqguard.training.tensorrt``).

Both entries of one export get the SAME version number (the next free one across the two), and
the artifact's ``metadata.json`` records it under ``triton``, because the gateway asks Triton for
``metadata.triton.model_version`` whichever model name (``SEQGUARD_TRITON_MODEL``) it talks to.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Sequence

from seqguard.triton_repo import (DEFAULT_KEEP_VERSIONS, DEFAULT_MODEL_NAME, next_version, onnx_dims,
                                  prune_versions, write_model_repository)

from .tensorrt import TRT_MODEL_NAME, TensorRTUnavailable, import_tensorrt, publish_tensorrt


def _log(msg: str) -> None:
    print(msg, flush=True)


def _record_export(model_dir: Path, meta: dict, repository: Path, version: int,
                   entries: Sequence[str]) -> None:
    """metadata.json: triton.model_version = the version this export holds (gateways ask for it)."""
    from seqguard.artifact import save_metadata
    meta = {k: v for k, v in meta.items() if k not in ("format", "format_version")}
    triton = dict(meta.get("triton", {}))
    triton.update({"model_name": triton.get("model_name", DEFAULT_MODEL_NAME),
                   "model_version": int(version)})
    history = list(triton.get("exports", []))
    history.append({"repository": str(repository.resolve()), "version": int(version),
                    "models": list(entries),
                    "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    triton["exports"] = history[-20:]
    meta["triton"] = triton
    save_metadata(model_dir, meta)


def export_onnx_repository(model_dir: str | os.PathLike, repository: str | os.PathLike | None = None,
                           instances: int = 1, *, version: int | None = None,
                           keep_versions: int | None = None, record: bool = True) -> Path:
    """(Re-)write the CPU Python-backend entry ``seqguard_encoder`` and return the repository.

    ``repository`` defaults to the artifact's own ``model_repository/``. The version is the next
    free one there (``version`` overrides). ``keep_versions`` (default 2, the template's) sets how
    many newest versions Triton keeps loaded: the previous version stays loaded so gateways still
    pinned to it keep working during a hot reload or rolling update, and a rollback needs no load.
    Version directories older than the newest ``keep_versions`` are deleted afterwards (Triton
    no longer serves them). With ``record`` the artifact's metadata.json is updated so the gateway asks
    Triton for this version; when the target is a shared repository the same version is also
    written into the artifact's own repository, so ``seqguard up --model DIR`` keeps working.
    """
    from seqguard.artifact import ModelArtifact
    art = ModelArtifact.load(model_dir)             # fails with a clear message on a bad dir
    own = art.repository_dir
    repository = Path(repository) if repository is not None else own
    shared = repository.resolve() != own.resolve()
    if keep_versions is None:
        keep_versions = DEFAULT_KEEP_VERSIONS
    n_features, hidden = onnx_dims(art.onnx_path)
    if hidden != art.hidden:
        raise ValueError(f"{art.onnx_path}: h_in has H={hidden}, metadata says {art.hidden}")
    if instances < 1:
        raise ValueError(f"instances must be >= 1, got {instances}")
    if version is None:
        # next free version; with a shared target also past the artifact's own repository, so
        # the mirrored copy there is its newest version too (the one a latest-1 policy serves)
        version = next_version(repository, DEFAULT_MODEL_NAME)
        if shared and record:
            version = max(version, next_version(own, DEFAULT_MODEL_NAME))

    targets = [(repository, keep_versions)]
    if shared and record:
        targets.append((own, keep_versions))
    for repo, keep in targets:
        write_model_repository(repo, art.onnx_path, model_name=DEFAULT_MODEL_NAME, version=version,
                               n_features=n_features, hidden=hidden, instances=instances,
                               keep_versions=keep)
        entry = repo / DEFAULT_MODEL_NAME
        pruned = prune_versions(entry, keep)
        if pruned:
            _log(f"removed version(s) {pruned} of {entry} (older than the newest {keep}, no longer served)")
        _log(f"wrote {entry / 'config.pbtxt'} (python backend, KIND_CPU x{instances}, "
             f"F={n_features}, H={hidden}, keeps {keep} version(s))")
        _log(f"wrote {entry / str(version) / 'model.onnx'} and model.py")
    if record:
        _record_export(art.path, art.metadata, repository, version, [DEFAULT_MODEL_NAME])
        _log(f"recorded triton.model_version={version} in {art.path / 'metadata.json'}")
    return repository


def main_export(args) -> int:
    """`seqguard export --model DIR [--repository PATH] [--instances N] [--tensorrt [--int8]]`.

    Optional attributes (``python -m seqguard.training.export`` has them as flags): ``plan`` (publish a
    prebuilt plan, e.g. from trtexec, instead of building one), ``max_batch`` (the plan's
    profile max, default 4096), ``calib_features`` (.npy of [N, F] features for --int8).
    """
    from seqguard.artifact import ArtifactError, ModelArtifact
    plan = getattr(args, "plan", None)
    want_trt = bool(getattr(args, "tensorrt", False) or plan)
    if getattr(args, "int8", False) and not getattr(args, "tensorrt", False):
        print("error: --int8 needs --tensorrt", file=sys.stderr)
        return 2
    if plan and not Path(plan).is_file():
        print(f"error: plan not found: {plan}", file=sys.stderr)
        return 2
    try:
        art = ModelArtifact.load(args.model)
    except ArtifactError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    repository = Path(args.repository) if getattr(args, "repository", None) else art.repository_dir
    instances = int(getattr(args, "instances", 1) or 1)
    max_batch = int(getattr(args, "max_batch", None) or 4096)
    # one version number for both entries (and for the mirror in the artifact's own repository),
    # so metadata.triton.model_version is valid whichever model name the gateway asks for
    version = max(next_version(repository, DEFAULT_MODEL_NAME),
                  next_version(art.repository_dir, DEFAULT_MODEL_NAME))
    if want_trt:
        version = max(version, next_version(repository, TRT_MODEL_NAME))
    if want_trt and not plan:            # fail before touching anything if TensorRT is not here
        try:
            import_tensorrt()
        except TensorRTUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    export_onnx_repository(art.path, repository, instances, version=version, record=False)
    entries = [DEFAULT_MODEL_NAME]
    rc = 0
    if want_trt:
        try:
            rc = publish_tensorrt(art, repository, version, instances, bool(getattr(args, "int8", False)),
                                  getattr(args, "calib_features", None), plan=plan, max_batch=max_batch)
            if rc == 0:
                entries.append(TRT_MODEL_NAME)
        except TensorRTUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            rc = 2
    own = art.repository_dir
    if repository.resolve() != own.resolve():
        export_onnx_repository(art.path, own, instances, version=version, record=False)
    _record_export(art.path, ModelArtifact.load(art.path).metadata, repository, version, entries)
    _log(f"recorded triton.model_version={version} in {art.path / 'metadata.json'}; "
         f"serve it with: tritonserver --model-repository={repository.resolve()}")
    if TRT_MODEL_NAME in entries:
        _log(f"gateway on GPU: SEQGUARD_TRITON_MODEL={TRT_MODEL_NAME} (same version {version})")
    return rc


if __name__ == "__main__":  # pragma: no cover - `seqguard export` is the entry point
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--repository")
    p.add_argument("--instances", type=int, default=1)
    p.add_argument("--tensorrt", action="store_true", help="build a TensorRT FP16 plan")
    p.add_argument("--int8", action="store_true", help="with --tensorrt: INT8 with calibration")
    p.add_argument("--calib-features", dest="calib_features", help=".npy [N, F] for INT8 calibration")
    p.add_argument("--plan", help="publish this prebuilt plan (e.g. from trtexec) instead of building")
    p.add_argument("--max-batch", dest="max_batch", type=int, default=4096,
                   help="the plan's optimization-profile max batch (Triton max_batch_size)")
    sys.exit(main_export(p.parse_args()))

