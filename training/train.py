"""`seqguard train`: event log -> encoder + IsolationForest -> versioned artifact + Triton entry.

Read top to bottom:
  1. read and validate the log; learn the event-type vocabulary
  2. replay it through the shared featuriser (global time order, cross-user contexts)
  3. train the LSTM self-supervised (next type + next gap) with truncated BPTT carrying state
  4. export the step graph to ONNX and check it against the torch model
  5. run the ONNX step over the training log, fit PCA + IsolationForest, calibrate risk
  6. write the artifact directory (with the drift baseline) and its Triton model repository
Labels are never needed; when given they are only used for a report line at the end.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from seqguard import artifact as art
from seqguard.batch import encode_log
from seqguard.detector import (DEFAULT_ACTION_FPR, DETECTOR_SIGNALS, RULES_WEIGHT, SEQUENCE_WEIGHT, SESSION_ALPHA,
                               TYPE_GROUPS, Detector, action_thresholds, fit_pca)
from seqguard.detector_fit import fit_detector, fit_session_stage, fit_views
from seqguard.featurizer import N_ENCODER_FEATURES, ContextStore, Featurizer, TokenHasher, Vocabulary, featurize_log
from seqguard.schema import ReadReport, read_events

from .model import EncoderConfig, SequenceEncoder, export_onnx


@dataclass
class TrainConfig:
    hidden: int = 128
    type_dim: int = 16
    epochs: int = 2
    batch_users: int = 64
    bptt: int = 64                  # truncated-BPTT window; state is carried across windows
    lr: float = 3e-3
    max_train_minutes: float = 60.0 # a safety cap, not a routine stop: an early stop leaves the
                                    # model under-trained and its quality dependent on machine load
    min_type_count: int = 5
    pca_dim: int = 64                # embedding dims given to the forests (fewer lose payment ROC-AUC)
    n_estimators: int = 200
    max_samples: int = 512
    forest_fit_events: int = 200_000
    session_alpha: float = SESSION_ALPHA  # detector stage 2 (seqguard/detector.py); 0 turns it off
    tail_forest: bool = True              # + a forest on each column's tail scale per group (detector.TailView)
    signal_floors: bool = True            # signals read directly in one group (detector.SIGNAL_FLOORS)
    # Contamination-robust fitting (training/robust_fit.py): in every forest sample and calibration
    # table an account keeps at most user_cap x the median account's events (>= user_cap_min), so a
    # heavy hitter (crawler fleet, script) cannot define normal. 0 = off, every event counts once.
    # 10 was chosen on design worlds 0-3 (docs/results/worlds_ablation.md).
    user_cap: float = 10.0
    user_cap_min: int = 20
    sequence_weight: float = SEQUENCE_WEIGHT  # the next-type NLL view's share of the FPR budget (detector.SequenceView); 0: off
    rules_weight: float = RULES_WEIGHT    # the rules view's share of the FPR budget (seqguard/rules_view.py); 0: off
    view_rules: str | None = None         # the rules pack of that view (None: configs/rules/default.toml)
    action_fpr: dict = field(default_factory=lambda: dict(DEFAULT_ACTION_FPR))
    seed: int = 0
    threads: int = 2


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def user_sequences(user_idx: np.ndarray, n_users: int) -> list[np.ndarray]:
    """Replay positions of each user's events, in order."""
    by_user = np.argsort(user_idx, kind="stable")
    counts = np.bincount(user_idx, minlength=n_users)
    return np.split(by_user, np.cumsum(counts)[:-1])


def train_encoder(cfg: TrainConfig, n_types: int, type_ids: np.ndarray, feats: np.ndarray,
                  seqs: list[np.ndarray], log=print, dist_ctx=None) -> tuple[SequenceEncoder, list[float]]:
    """Self-supervised training with truncated BPTT; batches group users of similar length.

    Under torchrun (`dist_ctx`, see training/distributed.py) each rank takes one batch of every
    step of `world` similar-length batches and DDP averages the gradients.
    """
    from .distributed import rank_schedule
    enc = SequenceEncoder(EncoderConfig(n_types=n_types, n_features=feats.shape[1], hidden=cfg.hidden,
                                        type_dim=cfg.type_dim))
    mean, std = feats.mean(axis=0), feats.std(axis=0)
    enc.set_normalisation(mean, std)
    rank, world = (dist_ctx.rank, dist_ctx.world) if dist_ctx else (0, 1)
    device = dist_ctx.device if dist_ctx else torch.device("cpu")
    enc.to(device)
    model = enc
    if dist_ctx:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(enc, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    rng = np.random.default_rng(cfg.seed)             # same seed on every rank: same step order
    lengths = np.array([len(s) for s in seqs])
    by_len = np.argsort(lengths, kind="stable")
    batches = [by_len[i:i + cfg.batch_users] for i in range(0, len(by_len), cfg.batch_users)]
    step_len = [int(lengths[[u for b in range(i, min(i + world, len(batches))) for u in batches[b]]].max())
                for i in range(0, len(batches), world)]
    total_windows = sum(int(np.ceil(L / cfg.bptt)) for L in step_len) * cfg.epochs
    t_type = torch.from_numpy(type_ids).to(device)
    t_feat = torch.from_numpy(feats).to(device)
    deadline = time.time() + cfg.max_train_minutes * 60
    losses: list[float] = []
    bar = tqdm(total=total_windows, desc="train encoder" + (f" (rank {rank}/{world})" if dist_ctx else ""),
               unit="win", mininterval=1.0, disable=rank != 0 or None)
    model.train()
    stopped = False
    my_windows = 0
    for epoch in range(cfg.epochs):
        ep_loss, ep_n = 0.0, 0
        for step in rank_schedule(len(batches), world, rng.permutation):
            mine = step[rank]
            L = max(int(lengths[batches[b]].max()) for b in step if b is not None)
            users = batches[mine] if mine is not None else batches[step[0]][:1]
            idx = np.zeros((len(users), L), np.int64)
            mask = np.zeros((len(users), L), bool)
            for r, u in enumerate(users):
                idx[r, :lengths[u]] = seqs[u]
                mask[r, :lengths[u]] = mine is not None
            idx_t, mask_t = torch.from_numpy(idx).to(device), torch.from_numpy(mask).to(device)
            state = None
            for a in range(0, L, cfg.bptt):
                sl = slice(a, a + cfg.bptt)
                w_idx, w_mask = idx_t[:, sl], mask_t[:, sl]
                _, surprise, state = model(t_type[w_idx], t_feat[w_idx], state)
                state = (state[0].detach(), state[1].detach())
                m = w_mask.float()
                loss = (surprise.sum(-1) * m).sum() / m.sum().clamp(min=1.0)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                ep_loss += float(loss.detach()) * float(m.sum())
                ep_n += int(m.sum())
                my_windows += int(m.sum() > 0)
                bar.update(1)
            late = time.time() > deadline
            if (dist_ctx.all_max(late) if dist_ctx else late):   # every rank stops at the same step
                stopped = True
                break
        if dist_ctx:
            ep_loss, ep_n = dist_ctx.all_sum(ep_loss, ep_n)
        losses.append(ep_loss / max(ep_n, 1))
        log(f"epoch {epoch + 1}: mean surprise (type + gap NLL) {losses[-1]:.4f}")
        if stopped:
            log(f"WARNING: stopped early in epoch {epoch + 1} of {cfg.epochs}: the {cfg.max_train_minutes} min "
                "training budget is spent; the encoder is under-trained (on 2 loaded cores 1 epoch instead "
                "of 2 cost 0.011 payment ROC-AUC and up to 0.26 recall on some families); raise "
                "--max-train-minutes or train on fewer users")
            break
    bar.close()
    if dist_ctx:
        log(f"rank {rank}/{world}: trained on {my_windows} windows of its own batches")
    enc.eval()
    return enc.cpu(), losses


def parity_error(onnx_out: np.ndarray, torch_out: np.ndarray) -> float:
    """Max |a - b| / max(1, |b|): absolute where values are small (h, in [-1, 1]), relative where they
    are large (the surprise is a negative log-likelihood, often 10-30, where float32 rounding alone
    differs by more than 1e-4 after a few hundred steps: worlds 100, 104 and 106 failed training so)."""
    return float((np.abs(onnx_out - torch_out) / np.maximum(1.0, np.abs(torch_out))).max())


def check_step_parity(enc: SequenceEncoder, onnx_path: str, type_ids, feats, seqs, n_users: int = 32) -> float:
    """parity_error of the ONNX step vs torch over the first events of a few users (h and surprise)."""
    from seqguard.encoding import OrtStep
    step = OrtStep(onnx_path, threads=1)
    worst = 0.0
    for s in [s for s in seqs if len(s)][:n_users]:
        s = s[:200]
        with torch.no_grad():
            h_seq, sur, _ = enc(torch.from_numpy(type_ids[s])[None], torch.from_numpy(feats[s])[None])
        h = np.zeros((1, enc.cfg.hidden), np.float32)
        c = np.zeros_like(h)
        for k, i in enumerate(s):
            h, c, emb, su = step(type_ids[i:i + 1], feats[i:i + 1], h, c)
            worst = max(worst, parity_error(emb[0], h_seq[0, k].numpy()), parity_error(su[0], sur[0, k].numpy()))
    return worst


def train(events_path: str, out_dir: str, cfg: TrainConfig, labels_path: str | None = None,
          column_map: dict | None = None, on_bad_row: str = "error", log=None) -> Path:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not (0.0 <= cfg.sequence_weight < 1.0 and 0.0 <= cfg.rules_weight < 1.0
            and cfg.sequence_weight + cfg.rules_weight < 1.0):
        raise ValueError(f"view weights must be >= 0 and leave the forests a share, got sequence "
                         f"{cfg.sequence_weight} and rules {cfg.rules_weight}")
    t0 = time.time()
    set_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # 1. read
    report = ReadReport()
    events = list(tqdm(read_events(events_path, column_map, on_bad_row, report), desc="read", unit="ev",
                       mininterval=1.0, leave=False))
    if report.skipped:
        log(report.summary())
    if not events:
        raise ValueError(f"{events_path}: no valid events to train on")
    vocab = Vocabulary.learn((e.event_type for e in events), cfg.min_type_count)
    featurizer = Featurizer(vocab, TokenHasher())
    log(f"read {len(events)} events; vocabulary of {len(vocab)} event types")

    # 2. featurise in global order
    order, type_ids, feats = featurize_log(featurizer, events, ContextStore(), progress=True)
    users: dict[str, int] = {}
    user_idx = np.array([users.setdefault(events[i].user_id, len(users)) for i in order], np.int64)
    seqs = user_sequences(user_idx, len(users))
    enc_feats = np.ascontiguousarray(feats[:, :N_ENCODER_FEATURES])   # the rest are detector-only
    log(f"featurised {len(events)} events of {len(users)} users ({time.time() - t0:.0f}s)")

    # 3. encoder (data-parallel when launched by torchrun; rank 0 alone goes on to export)
    from .distributed import init_from_env, shutdown
    dist_ctx = init_from_env()
    try:
        enc, losses = train_encoder(cfg, len(vocab), type_ids, enc_feats, seqs, log, dist_ctx)
        if dist_ctx and os.environ.get("SEQGUARD_DDP_WEIGHTS_DIGEST"):     # lets tests compare ranks
            digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in enc.parameters())).hexdigest()
            Path(os.environ["SEQGUARD_DDP_WEIGHTS_DIGEST"] + f".{dist_ctx.rank}").write_text(digest)
    finally:
        shutdown(dist_ctx)
    if dist_ctx and not dist_ctx.is_main:
        return out

    # 4. export + parity
    onnx_path = out / art.ONNX_FILE
    export_onnx(enc, str(onnx_path))
    parity = check_step_parity(enc, str(onnx_path), type_ids, enc_feats, seqs)
    log(f"ONNX step vs torch sequence: max error {parity:.2e} (absolute below 1, relative above)")
    if parity > 1e-4:
        raise RuntimeError(f"exported step model disagrees with torch by {parity:.2e}")
    torch.save({"config": enc.cfg.to_dict(), "state_dict": enc.state_dict()}, out / "encoder.pt")

    # 5. detector on the ONNX path's embeddings (exactly what serving computes)
    sample_users = np.random.default_rng(cfg.seed).permutation(len(seqs))[:2000]
    with torch.no_grad():
        sample = []
        for u in sample_users:
            s = seqs[u][:512]
            h_seq, _, _ = enc(torch.from_numpy(type_ids[s])[None], torch.from_numpy(enc_feats[s])[None])
            sample.append(h_seq[0].numpy())
    pca_mean, pca = fit_pca(np.concatenate(sample), cfg.pca_dim)
    project = lambda e: (np.asarray(e, np.float64) - pca_mean) @ pca  # noqa: E731  (same as Detector.project)
    enc_log = encode_log(featurizer, events, onnx_path=onnx_path, reduce=project, progress=True,
                         threads=cfg.threads)
    fitted = fit_detector(cfg, enc_log.emb, enc_log.surprise, enc_log.feats, enc_log.type_ids, vocab.tokens, log,
                          user_idx=enc_log.user_idx)
    detector = Detector(pca_mean, pca, fitted.signal_cols, fitted.forests, fitted.calibrators, fitted.groups,
                        action_thresholds(cfg.action_fpr), tail_views=fitted.tail_views, floors=fitted.floors)
    fit_views(detector, enc_log, cfg, vocab.tokens, log)
    train_risk = fit_session_stage(detector, enc_log, cfg.session_alpha, log, cfg)
    np.savez(out / art.DETECTOR_FILE, **detector.to_arrays())
    import joblib
    joblib.dump(fitted.sklearn_forests, out / "isolation_forest.joblib")   # list: one per type group
    if fitted.sklearn_tail_forests is not None:                           # their twins on tail-scaled inputs
        joblib.dump(fitted.sklearn_tail_forests, out / "isolation_forest_tail_scaled.joblib")

    # 6. drift baseline (drift_reference.json), metadata + Triton repository
    _write_drift_reference(out, train_risk, enc_log, featurizer.spec()["feature_names"], cfg.seed, log)
    digest = hashlib.sha256(onnx_path.read_bytes() + (out / art.DETECTOR_FILE).read_bytes()).hexdigest()[:8]
    model_version = f"{dt.datetime.now(dt.timezone.utc):%Y%m%d}-{digest}"
    from seqguard.triton_repo import write_model_repository
    write_model_repository(out / "model_repository", onnx_path, version=1, n_features=enc_feats.shape[1],
                           hidden=cfg.hidden)
    import sklearn
    meta = {
        "model_version": model_version,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "schema_hash": featurizer.schema_hash(),
        "featurizer": featurizer.spec(),
        "encoder": enc.cfg.to_dict(),
        "detector": {"signals": list(DETECTOR_SIGNALS), "type_groups": [g for g, _ in TYPE_GROUPS], "pca_dim": cfg.pca_dim, "n_estimators": cfg.n_estimators,
                     "session_alpha": detector.session_alpha, "tail_forest": cfg.tail_forest,
                     "signal_floors": [f.feature for f in fitted.floors],
                     "sequence_weight": detector.sequence_view.weight if detector.sequence_view else 0.0,
                     "rules_weight": detector.rules_weight if detector.rules_view else 0.0,
                     "view_rules": ({"name": detector.rules_view.rules.name, "digest": detector.rules_view.rules.digest}
                                    if detector.rules_view else None),
                     "max_samples": cfg.max_samples, "sklearn_version": sklearn.__version__},
        "action_fpr": cfg.action_fpr,
        "thresholds": detector.thresholds,
        "triton": {"model_name": "seqguard_encoder", "model_version": 1},
        "training": {"events_file": os.path.abspath(events_path), "events": len(events), "users": len(users),
                     "skipped_rows": report.skipped, "epoch_losses": losses, "onnx_parity": parity,
                     "seconds": round(time.time() - t0, 1), "config": asdict(cfg),
                     "feature_mean": enc_feats.mean(axis=0).tolist(), "feature_std": enc_feats.std(axis=0).tolist()},
    }
    art.save_metadata(out, meta)
    log(f"wrote model {model_version} to {out} in {time.time() - t0:.0f}s")
    if labels_path:
        _report_with_labels(out, events, labels_path, log)
    return out


DRIFT_REFERENCE_MAX_EVENTS = 500_000   # deciles of half a million rows are stable; caps the extra scoring time


def _write_drift_reference(out: Path, train_risk: np.ndarray, enc_log, feature_names, seed: int, log) -> None:
    """drift_reference.json: risk and feature distributions of the training log, so `seqguard drift`
    needs no --reference. Risk is the served risk on the ONNX path's encodings, exactly as score-file
    computes it; logs above DRIFT_REFERENCE_MAX_EVENTS use a uniform random sample of events."""
    from .drift import build_reference, save_reference
    t0 = time.time()
    n = len(enc_log.feats)
    rows = np.arange(n) if n <= DRIFT_REFERENCE_MAX_EVENTS else np.sort(
        np.random.default_rng(seed).choice(n, DRIFT_REFERENCE_MAX_EVENTS, replace=False))
    risk = np.asarray(train_risk, np.float64)[rows]
    path = save_reference(out, build_reference(risk, np.asarray(enc_log.feats[rows], np.float64),
                                               list(feature_names)))
    log(f"drift reference from {len(rows)} of {n} training events written to {path} ({time.time() - t0:.0f}s)")


def _report_with_labels(model_dir: Path, events, labels_path: str, log) -> None:
    """Labels are optional: a one-line ROC-AUC so the trainer sees if the model learned anything."""
    from sklearn.metrics import roc_auc_score
    from seqguard.batch import score_events
    labels = {}
    with open(labels_path) as f:
        for line in f:
            r = json.loads(line)
            labels[r["event_id"]] = int(r["label"])
    y = np.array([labels.get(e.event_id, 0) for e in events])
    if y.min() == y.max():
        return
    risk, _, _ = score_events(art.ModelArtifact.load(model_dir), events)
    pay = np.array([e.event_type == "payment" for e in events])
    msg = f"training-log ROC-AUC (labels used for reporting only): all events {roc_auc_score(y, risk):.4f}"
    if pay.any() and 0 < y[pay].mean() < 1:
        msg += f", payments {roc_auc_score(y[pay], risk[pay]):.4f}"
    log(msg)
