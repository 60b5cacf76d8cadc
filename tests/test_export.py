"""`seqguard export`: the CPU (Python-backend) repository entry, the TensorRT entry's config, and
(on a GPU with TensorRT) the engine's parity with ONNX Runtime.

The config texts are parsed with Triton's own ModelConfig protobuf (shipped in tritonclient), so
a typo that tritonserver would reject fails here without a server.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from seqguard.training.export import export_onnx_repository, main_export
from seqguard.training.tensorrt import (TRT_MODEL_NAME, calibration_batches, render_tensorrt_config,
                                        write_tensorrt_repository)
from seqguard.triton_repo import onnx_dims, render_config


def parse_config(text: str):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def versions(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _gpu_skip_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return ("TensorRT Python bindings not installed: on a GPU machine `pip install tensorrt-cu12==10.5.0` "
                "(inside nvcr.io/nvidia/tritonserver:24.10-py3: docs/gpu.md)")
    try:
        import torch
    except ImportError:
        return "torch not installed"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


GPU_SKIP = _gpu_skip_reason()


@pytest.fixture()
def model_copy(small_model, tmp_path) -> Path:
    """A private copy of the session's small trained model (export rewrites its metadata)."""
    dst = tmp_path / "model"
    shutil.copytree(small_model, dst)
    return dst


def triton_meta(model_dir: Path) -> dict:
    return json.loads((model_dir / "metadata.json").read_text())["triton"]


# ------------------------------------------------------------------ (a) CPU repository entry
def test_export_into_own_repository_writes_valid_entry_and_bumps_version(model_copy):
    own = model_copy / "model_repository"
    entry = own / "seqguard_encoder"
    assert versions(entry) == [1]                      # written by training

    repo = export_onnx_repository(model_copy, instances=2)
    assert repo == own
    assert versions(entry) == [1, 2]
    for name in ("model.py", "model.onnx"):
        assert (entry / "2" / name).is_file()
    assert (entry / "2" / "model.onnx").read_bytes() == (model_copy / "model.onnx").read_bytes()
    n_features, hidden = onnx_dims(model_copy / "model.onnx")
    assert hidden == 32
    text = (entry / "config.pbtxt").read_text()
    assert text == render_config(n_features=n_features, hidden=hidden, instances=2)
    cfg = parse_config(text)
    assert cfg.backend == "python" and cfg.max_batch_size == 1024
    assert cfg.instance_group[0].count == 2
    # the previous version stays loaded while the gateway switches (it asks for an explicit version)
    assert cfg.version_policy.latest.num_versions == 2
    assert triton_meta(model_copy)["model_version"] == 2   # the gateway asks Triton for this one

    export_onnx_repository(model_copy)
    assert versions(entry) == [2, 3]                   # v1 is outside the newest-2 window: pruned
    assert triton_meta(model_copy)["model_version"] == 3
    assert not [p for p in entry.iterdir() if p.name.startswith(".")]    # no staging leftovers


def test_export_into_shared_repository_keeps_two_versions_and_mirrors(model_copy, tmp_path):
    shared = tmp_path / "shared"
    export_onnx_repository(model_copy, shared)
    export_onnx_repository(model_copy, shared)
    entry = shared / "seqguard_encoder"
    got = versions(entry)
    assert len(got) == 2 and got[1] > got[0]
    cfg = parse_config((entry / "config.pbtxt").read_text())
    # the previous version stays loaded while gateways roll over to the new one
    assert cfg.version_policy.latest.num_versions == 2
    meta = triton_meta(model_copy)
    assert meta["model_version"] == got[1]
    assert meta["exports"][-1]["repository"] == str(shared.resolve())
    # the artifact's own repository serves the same version number (seqguard up keeps working)
    own = model_copy / "model_repository" / "seqguard_encoder"
    assert max(versions(own)) == got[1]
    assert parse_config((own / "config.pbtxt").read_text()).version_policy.latest.num_versions == 2


def test_main_export_cli_path(model_copy, tmp_path, capsys):
    rc = main_export(Namespace(model=str(model_copy), repository=str(tmp_path / "r"), tensorrt=False,
                               int8=False, instances=1))
    assert rc == 0
    assert versions(tmp_path / "r" / "seqguard_encoder") == [2]   # past the artifact's own v1
    assert "recorded triton.model_version=2" in capsys.readouterr().out
    assert main_export(Namespace(model=str(tmp_path), repository=None, tensorrt=False, int8=False,
                                 instances=1)) == 2                # not a model dir: clear error
    assert main_export(Namespace(model=str(model_copy), repository=None, tensorrt=False, int8=True,
                                 instances=1)) == 2                # --int8 needs --tensorrt


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed")
def test_tensorrt_requested_without_tensorrt_fails_cleanly(model_copy, capsys):
    before = versions(model_copy / "model_repository" / "seqguard_encoder")
    rc = main_export(Namespace(model=str(model_copy), repository=None, tensorrt=True, int8=False,
                               instances=1))
    assert rc == 2
    err = capsys.readouterr().err
    assert "docs/gpu.md" in err and "nvcr.io/nvidia/" in err
    assert versions(model_copy / "model_repository" / "seqguard_encoder") == before   # nothing written


@pytest.mark.skipif(GPU_SKIP is None, reason="a fake plan would fail the real parity check on this GPU")
def test_prebuilt_plan_is_published_with_the_onnx_version(model_copy, tmp_path, capsys):
    """The trtexec path: `python -m seqguard.training.export --model DIR --plan model.plan`."""
    plan = tmp_path / "trtexec.plan"
    plan.write_bytes(b"engine-bytes")
    repo = tmp_path / "repo"
    rc = main_export(Namespace(model=str(model_copy), repository=str(repo), tensorrt=False, int8=False,
                               instances=2, plan=str(plan), max_batch=2048))
    out = capsys.readouterr().out
    assert rc == 0, out
    v = triton_meta(model_copy)["model_version"]
    assert versions(repo / "seqguard_encoder") == [v] and versions(repo / TRT_MODEL_NAME) == [v]
    assert (repo / TRT_MODEL_NAME / str(v) / "model.plan").read_bytes() == b"engine-bytes"
    cfg = parse_config((repo / TRT_MODEL_NAME / "config.pbtxt").read_text())
    assert cfg.max_batch_size == 2048 and cfg.instance_group[0].count == 2
    assert "parity NOT checked" in out
    assert TRT_MODEL_NAME in triton_meta(model_copy)["exports"][-1]["models"]


def test_module_entry_point_keeps_the_export_flags(model_copy):
    """`python -m seqguard.training.export` (the publish job in deploy/k8s runs it) writes the CPU entry."""
    before = triton_meta(model_copy).get("model_version", 0)
    out = subprocess.run([sys.executable, "-m", "seqguard.training.export", "--model", str(model_copy),
                          "--instances", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    version = triton_meta(model_copy)["model_version"]
    assert version == before + 1
    entry = model_copy / "model_repository" / "seqguard_encoder"
    assert parse_config((entry / "config.pbtxt").read_text()).instance_group[0].count == 2
    assert (entry / str(version) / "model.onnx").is_file()
    helptext = subprocess.run([sys.executable, "-m", "seqguard.training.export", "--help"],
                              capture_output=True, text=True, timeout=120).stdout
    for flag in ("--repository", "--tensorrt", "--int8", "--calib-features", "--plan", "--max-batch"):
        assert flag in helptext


# ------------------------------------------------------------------ (b) TensorRT config rendering
def test_render_tensorrt_config():
    text = render_tensorrt_config(n_features=40, hidden=128, max_batch_size=4096, instances=2, gpus=[0, 1])
    cfg = parse_config(text)
    assert cfg.name == TRT_MODEL_NAME
    assert cfg.platform == "tensorrt_plan"
    assert cfg.max_batch_size == 4096
    assert cfg.default_model_filename == "model.plan"
    assert [g.kind for g in cfg.instance_group] == [cfg.instance_group[0].KIND_GPU]
    assert cfg.instance_group[0].count == 2 and list(cfg.instance_group[0].gpus) == [0, 1]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [64, 256, 1024]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 100
    assert cfg.version_policy.latest.num_versions == 2
    from tritonclient.grpc import model_config_pb2 as mc
    ins = {i.name: (i.data_type, list(i.dims)) for i in cfg.input}
    outs = {o.name: (o.data_type, list(o.dims)) for o in cfg.output}
    assert ins == {"event_type": (mc.TYPE_INT64, [1]), "features": (mc.TYPE_FP32, [40]),
                   "h_in": (mc.TYPE_FP32, [128]), "c_in": (mc.TYPE_FP32, [128])}
    assert outs == {"h_out": (mc.TYPE_FP32, [128]), "c_out": (mc.TYPE_FP32, [128]),
                    "embedding": (mc.TYPE_FP32, [128]), "surprise": (mc.TYPE_FP32, [2])}
    # the input/output contract is the same as the CPU entry's (the gateway can switch models)
    cpu = parse_config(render_config(n_features=40, hidden=128))
    assert [(i.name, i.data_type, list(i.dims)) for i in cpu.input] == \
           [(i.name, i.data_type, list(i.dims)) for i in cfg.input]
    assert [(o.name, o.data_type, list(o.dims)) for o in cpu.output] == \
           [(o.name, o.data_type, list(o.dims)) for o in cfg.output]


def test_render_tensorrt_config_options_and_errors():
    cfg = parse_config(render_tensorrt_config(max_batch_size=128))
    assert list(cfg.dynamic_batching.preferred_batch_size) == [64]      # sizes above max dropped
    assert not cfg.instance_group[0].gpus                               # no gpus: all visible GPUs
    assert "TYPE_INT32" in render_tensorrt_config(event_type_dtype="TYPE_INT32")
    for bad in ({"hidden": 0}, {"instances": 0}, {"max_queue_delay_us": -1},
                {"model_name": "a b"}, {"event_type_dtype": "TYPE_FP32"}):
        with pytest.raises(ValueError):
            render_tensorrt_config(**bad)


def test_write_tensorrt_repository(tmp_path):
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"not-a-real-engine")
    model_dir = write_tensorrt_repository(tmp_path / "repo", plan, version=3, n_features=8, hidden=16,
                                          max_batch_size=1024, instances=2, gpus=[0])
    assert model_dir == tmp_path / "repo" / TRT_MODEL_NAME
    assert (model_dir / "3" / "model.plan").read_bytes() == b"not-a-real-engine"
    assert plan.exists()                                                 # copied, not moved
    cfg = parse_config((model_dir / "config.pbtxt").read_text())
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 1024
    assert [list(i.dims) for i in cfg.input] == [[1], [8], [16], [16]]
    with pytest.raises(FileNotFoundError):
        write_tensorrt_repository(tmp_path / "repo", tmp_path / "missing.plan", n_features=8, hidden=16)


def test_calibration_batches_carry_state_forward(tiny_step_onnx):
    import onnxruntime as ort
    feats = np.random.default_rng(1).standard_normal((100, 8)).astype(np.float32)
    batches = calibration_batches(tiny_step_onnx, batch=32, n_batches=3, features=feats)
    assert len(batches) == 3
    assert all(b["event_type"].dtype == np.int64 and b["event_type"].max() < 6 for b in batches)
    assert not batches[0]["h_in"].any()                                   # new users first
    sess = ort.InferenceSession(str(tiny_step_onnx), providers=["CPUExecutionProvider"])
    h, _ = sess.run(["h_out", "c_out"], batches[0])
    kept = batches[1]["h_in"].any(axis=1)                                 # rows not reset
    assert kept.sum() > 16
    np.testing.assert_allclose(batches[1]["h_in"][kept], h[kept], rtol=0, atol=0)
    with pytest.raises(ValueError):
        calibration_batches(tiny_step_onnx, batch=4, n_batches=1, features=np.zeros((5, 3), np.float32))


# ------------------------------------------------------------------ (c) TensorRT on a GPU
@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=str(GPU_SKIP))
def test_tensorrt_fp16_engine_matches_onnxruntime(tmp_path):
    import torch
    from seqguard.training.tensorrt import build_tensorrt_engine, check_tensorrt_parity, time_tensorrt
    from seqguard.training.model import EncoderConfig, SequenceEncoder, export_onnx

    torch.manual_seed(0)
    enc = SequenceEncoder(EncoderConfig(n_types=12, n_features=40, hidden=32)).eval()
    onnx_path = tmp_path / "model.onnx"
    export_onnx(enc, str(onnx_path))
    plan = build_tensorrt_engine(onnx_path, tmp_path / "model.plan", fp16=True,
                                 min_batch=1, opt_batch=64, max_batch=1024, workspace_gb=1)
    assert plan.stat().st_size > 0
    details: dict = {}
    diff = check_tensorrt_parity(plan, onnx_path, n=512, details=details)
    print(f"FP16 TensorRT vs ONNX Runtime: max abs diff {diff:.2e} {details}")
    assert diff < 1e-2, details
    # batch 1 and the profile max both run
    assert [b for b, _ in time_tensorrt(plan, 40, 32, batches=(1, 1024), iters=5)] == [1, 1024]
    model_dir = write_tensorrt_repository(tmp_path / "repo", plan, n_features=40, hidden=32,
                                          max_batch_size=1024)
    assert (model_dir / "1" / "model.plan").stat().st_size == plan.stat().st_size
