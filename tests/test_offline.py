"""Offline core end to end: train, ONNX step parity, deterministic score-file, sparse logs."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from seqguard.artifact import ArtifactError, ModelArtifact
from seqguard.batch import encode_log, score_events
from seqguard.encoding import OrtStep, carried_state
from seqguard.featurizer import N_ENCODER_FEATURES
from seqguard.schema import read_events
from seqguard.training.model import EncoderConfig, SequenceEncoder, StepModel, export_onnx
from seqguard.training.train import TrainConfig, train

SEQGUARD = [sys.executable, "-m", "seqguard.cli"]


def test_torch_sequence_vs_onnx_step_parity(small_model, small_log):
    """The offline replay (ONNX step, all users at once, state carried as float16) equals torch's
    step run the same way, up to one float16 step of the carried state (torch and ONNX Runtime differ
    in the last float32 bits, which a rounding can turn into one float16 step; online and offline both
    run ONNX Runtime, so they agree bit for bit: test_gateway); and carrying the state as float16 moves
    it from the float32 sequence model the encoder was trained as by a few thousandths at most."""
    ck = torch.load(small_model / "encoder.pt")
    enc = SequenceEncoder(EncoderConfig(**ck["config"]))
    enc.load_state_dict(ck["state_dict"])
    enc.eval()
    step = StepModel(enc).eval()
    model = ModelArtifact.load(small_model)
    events = list(read_events(str(small_log[0])))
    log = encode_log(model, events)                     # full embeddings via the ONNX step, all users at once
    exact = skew = 0.0
    for u in range(25):
        rows = np.flatnonzero(log.user_idx == u)
        types = torch.from_numpy(log.type_ids[rows])
        feats = torch.from_numpy(log.feats[rows][:, :N_ENCODER_FEATURES].copy())
        h = c = torch.zeros(1, enc.cfg.hidden)
        with torch.no_grad():
            h_seq, sur_seq, _ = enc(types[None], feats[None])
            for k in range(len(rows)):
                h_new, c_new, emb, sur = step(types[k:k + 1, None], feats[k:k + 1], h, c)
                exact = max(exact, np.abs(emb[0].numpy() - log.emb[rows[k]]).max(),
                            np.abs(sur[0].numpy() - log.surprise[rows[k]]).max())
                h, c = (torch.from_numpy(carried_state(x.numpy())) for x in (h_new, c_new))
        skew = max(skew, np.abs(h_seq[0].numpy() - log.emb[rows]).max())
    assert exact <= 2e-3, exact
    assert skew <= 2e-2, skew


def test_step_graph_is_batch_invariant(tmp_path):
    """Each row's bits do not depend on what else is in the batch: what makes online == offline exact."""
    torch.manual_seed(0)
    enc = SequenceEncoder(EncoderConfig(n_types=20, hidden=64)).eval()
    export_onnx(enc, str(tmp_path / "m.onnx"))
    step = OrtStep(str(tmp_path / "m.onnx"), threads=1)
    rng = np.random.default_rng(0)
    t = rng.integers(0, 20, 300)
    x = rng.normal(size=(300, 40)).astype(np.float32)
    h = rng.normal(size=(300, 64)).astype(np.float32)
    c = rng.normal(size=(300, 64)).astype(np.float32)
    full = step(t, x, h, c)
    for a, b in ((0, 1), (5, 6), (10, 47), (100, 300)):
        part = step(t[a:b], x[a:b], h[a:b], c[a:b])
        for p, f in zip(part, full):
            assert np.array_equal(p, f[a:b])


def test_score_file_cli_is_deterministic(small_model, small_log, tmp_path):
    outs = []
    for k in range(2):
        out = tmp_path / f"s{k}.csv"
        subprocess.run(SEQGUARD + ["score-file", "--model", str(small_model), "--input", str(small_log[0]),
                                   "--output", str(out), "--quiet"], check=True, capture_output=True)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    rows = list(csv.DictReader(open(tmp_path / "s0.csv")))
    assert list(rows[0]) == ["event_id", "user_id", "risk", "action", "model_version"]
    assert len(rows) == len(small_log[2])
    risk = np.array([float(r["risk"]) for r in rows])
    assert risk.min() >= 0 and risk.max() <= 1 and risk.std() > 0.05
    assert {r["action"] for r in rows} <= {"ALLOW", "REVIEW", "CHALLENGE", "BLOCK"}


def test_score_file_names_bad_row(small_model, tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"event_id": "a", "user_id": "u", "ts": 1767225600000, "event_type": "login"}) + "\n"
                 + json.dumps({"event_id": "b", "user_id": "u", "ts": "soon", "event_type": "login"}) + "\n")
    r = subprocess.run(SEQGUARD + ["score-file", "--model", str(small_model), "--input", str(p),
                                   "--output", str(tmp_path / "o.csv")], capture_output=True, text=True)
    assert r.returncode == 2 and "row 2" in r.stderr and "'ts'" in r.stderr
    assert not (tmp_path / "o.csv").exists()


def test_sparse_log_with_team_event_types(tmp_path):
    """Only the required fields, event types outside the common list: train, score, unseen type at scoring."""
    rng = np.random.default_rng(2)
    types = ["open_app", "browse", "buy", "login", "payment", "wishlist"]
    rows = []
    for u in range(60):
        ts = 1767225600000 + int(rng.integers(0, 10**7))
        for k in range(int(rng.integers(5, 40))):
            ts += int(rng.exponential(90_000))
            rows.append({"event_id": f"{u}-{k}", "user_id": f"user{u}", "ts": ts,
                         "event_type": types[int(rng.integers(0, len(types)))]})
    rows.append({"event_id": "new-1", "user_id": "user1", "ts": ts + 1, "event_type": "brand_new_type"})
    p = tmp_path / "sparse.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    model_dir = train(str(p), str(tmp_path / "m"), TrainConfig(hidden=16, epochs=1, n_estimators=30,
                                                               max_samples=64), log=lambda m: None)
    meta = json.loads((model_dir / "metadata.json").read_text())
    assert {"open_app", "browse", "wishlist"} <= set(meta["featurizer"]["vocab"])
    p2 = tmp_path / "sparse2.jsonl"
    p2.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = ModelArtifact.load(model_dir)
    events = list(read_events(str(p2)))
    risk, actions, _ = score_events(model, events)
    assert len(risk) == len(rows) and np.isfinite(risk).all()


def test_artifact_refuses_schema_mismatch(small_model, tmp_path):
    import shutil
    bad = tmp_path / "m"
    shutil.copytree(small_model, bad)
    meta = json.loads((bad / "metadata.json").read_text())
    meta["schema_hash"] = "0000000000000000"
    (bad / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="schema hash"):
        ModelArtifact.load(bad)


def test_signal_floors_are_fitted_and_flag_a_crawler_early(small_model, small_log):
    """The trained detector has both signal floors, each in the group of its event type, and a crawler
    (page views every 2 s +- 2%) scores high from about its 15th event (gap_jitter; gap_std, the encoder's
    regularity signal, needs ~30 more events), far above the same views at human pace."""
    from seqguard.detector import SIGNAL_FLOORS
    from seqguard.schema import events_from_dicts
    art = ModelArtifact.load(small_model)
    det, vocab = art.detector, art.featurizer.vocab
    assert [(f.feature, f.group, f.side) for f in det.floors] == [
        (name, int(det.type_group[vocab.id(t)]), side) for name, t, side, _ in SIGNAL_FLOORS]
    assert art.metadata["detector"]["signal_floors"] == [s[0] for s in SIGNAL_FLOORS]
    rng = np.random.default_rng(2)
    t0 = 1767225600000 + 3 * 86_400_000

    def views(user, gaps_ms):
        ts = t0 + np.concatenate([[0], np.cumsum(gaps_ms)]).astype(np.int64)
        return [dict(event_id=f"{user}-{k}", user_id=user, ts=int(t), event_type="view_item", item_id=f"i{k}",
                     category="books", amount=None, device_id=f"{user}-dev", ip="100.64.3.4", country="DE",
                     session_id=f"{user}-s") for k, t in enumerate(ts)]
    bot, human = views("crawler", 2000 * (1 + 0.02 * rng.standard_normal(59))), views(
        "reader", rng.lognormal(np.log(30_000), 1.0, 59))
    risk, _, _ = score_events(art, events_from_dicts(bot + human))
    # (this 400-user log is ~20% crawler traffic; before the per-account cap (--user-cap, on by default)
    # that traffic made the floor weak until ~15 events; capped, the crawler is already high earlier)
    assert np.median(risk[16:30]) > 0.95 and np.median(risk[:4]) < np.median(risk[16:30]) - 0.2, risk[:60]
    # margin 0.05: capped tables also weigh this log's heavier human readers less, which lifts the
    # human-pace views (max 0.92 with the cap, lower without); the crawler stays above all of them
    assert np.min(risk[16:60]) > np.max(risk[60:]) + 0.05, (risk[16:60], risk[60:])


def test_step_parity_error_is_relative_for_large_values():
    """A surprise of 25 nats that float32 rounding moves by 3e-4 is a match (it failed `seqguard train` on
    three randomised worlds); the same 3e-4 on a hidden state in [-1, 1] is not."""
    from seqguard.training.train import parity_error
    assert parity_error(np.array([25.0003], np.float32), np.array([25.0], np.float32)) < 1e-4
    assert parity_error(np.array([0.5003], np.float32), np.array([0.5], np.float32)) > 1e-4
