"""A small causal Transformer encoder over a user's last N events: the challenger to the LSTM.

Same inputs per event as the LSTM (the shared featuriser's vector + a type embedding, with the
same feature standardisation: `SequenceEncoder.inputs`) and the same self-supervised objective
(NLL of the next event's type and log gap: `SequenceEncoder.surprise`). The embedding of event t
is the output at position t of the window [t-N+1, t], i.e. the newest event is read out of a
causal self-attention stack over at most N events.

Why it is offline only: online, the LSTM carries (h, c) per user and does O(1) work per event,
while this encoder must keep the last N-1 featurised events per user and recompute attention
over the whole window for every new event (O(N) tokens per event, O(N^2) attention).
`measure_latency` puts a number on that; `python -m seqguard.training.compare --encoders lstm,transformer`
runs the quality comparison on the same data and detector.

Windows are right-padded: positions 0..m-1 hold the m (<= N) newest events and the read-out is
position m-1, so a history shorter than N gives exactly the causal output at that position.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import SequenceEncoder

MODEL_FILE = "transformer.pt"


@dataclass
class TransformerConfig:
    n_types: int                 # vocabulary size (id 0 = unknown), as EncoderConfig
    n_features: int = 40
    d_model: int = 80            # 113.5k parameters with 20 types vs the LSTM's 98.4k (hidden 128)
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 160
    type_dim: int = 16
    window: int = 32             # N: events the embedding of event t looks at, t included

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TransformerTrainConfig:
    epochs: int = 2              # the LSTM default (runs/m20k_p64) trained 2 epochs on the same log
    batch_windows: int = 128
    lr: float = 2e-3
    warmup_steps: int = 50
    max_train_minutes: float = 12.0
    pca_dim: int = 64            # as TrainConfig.pca_dim
    pca_users: int = 2000        # as train.py: PCA on the embeddings of 2,000 random training users
    seed: int = 0
    threads: int = 1
    model: TransformerConfig | None = None   # None: defaults with the log's vocabulary size


class _Block(nn.Module):
    """Pre-LN attention block written with plain ops (exports to ONNX without fused kernels)."""

    def __init__(self, d: int, heads: int, ff: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ff1, self.ff2 = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """x [B,T,D] -> [B,T,D]; with `last` [B] only the row at position last (keys: 0..last) -> [B,1,D].

        The read-out form skips the queries, projection and MLP of every other row: what an online
        update needs from the final layer (same arithmetic for the row it keeps)."""
        B, T, D = x.shape
        H, dh = self.heads, D // self.heads
        h = self.ln1(x)
        if last is None:
            q, k, v = self.qkv(h).reshape(B, T, 3, H, dh).permute(2, 0, 3, 1, 4)
        else:
            x = x.gather(1, last.view(-1, 1, 1).expand(-1, 1, D))
            q = F.linear(h.gather(1, last.view(-1, 1, 1).expand(-1, 1, D)), self.qkv.weight[:D],
                         self.qkv.bias[:D]).reshape(B, 1, H, dh).transpose(1, 2)
            k, v = F.linear(h, self.qkv.weight[D:], self.qkv.bias[D:]).reshape(B, T, 2, H, dh).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) * (1.0 / math.sqrt(dh)) + mask_bias, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(B, x.shape[1], D))
        return x + self.ff2(F.gelu(self.ff1(self.ln2(x))))


class WindowEncoder(nn.Module):
    # the LSTM's input layer and objective, literally (they use only the attributes set below)
    inputs = SequenceEncoder.inputs
    surprise = SequenceEncoder.surprise
    set_normalisation = SequenceEncoder.set_normalisation

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.type_emb = nn.Embedding(cfg.n_types, cfg.type_dim)
        self.in_proj = nn.Linear(cfg.type_dim + cfg.n_features, cfg.d_model)
        self.pos = nn.Parameter(torch.zeros(cfg.window, cfg.d_model))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(_Block(cfg.d_model, cfg.n_heads, cfg.d_ff) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.type_head = nn.Linear(cfg.d_model, cfg.n_types)
        self.gap_head = nn.Linear(cfg.d_model, 2)
        self.register_buffer("feat_mean", torch.zeros(cfg.n_features))
        self.register_buffer("feat_inv_std", torch.ones(cfg.n_features))
        causal = torch.triu(torch.full((cfg.window, cfg.window), float("-inf")), diagonal=1)
        self.register_buffer("causal", causal, persistent=False)

    def forward(self, type_ids: torch.Tensor, feats: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """type_ids [B,T], feats [B,T,F] with T <= N -> causal outputs [B,T,D] (position t sees 0..t);
        with `last` [B] (int64): only the output at position last[b] of each row -> [B,D]."""
        T = type_ids.shape[1]
        x = self.in_proj(self.inputs(type_ids, feats)) + self.pos[:T]
        bias = self.causal[:T, :T]
        for blk in self.blocks[:-1]:
            x = blk(x, bias)
        if last is None:
            return self.ln_f(self.blocks[-1](x, bias))
        keys = torch.arange(T, device=x.device).view(1, 1, 1, T)
        last_bias = torch.where(keys > last.view(-1, 1, 1, 1), float("-inf"), 0.0)   # [B,1,1,T]
        return self.ln_f(self.blocks[-1](x, last_bias, last))[:, 0]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


class WindowStep(nn.Module):
    """The online update of one event for a batch of users, as serving would run it.

    (event_type [B,N], features [B,N,F] right-padded windows ending at the new event, length [B],
    prev_embedding [B,D] = the previous event's embedding, zeros for a first event)
    -> (embedding [B,D], surprise [B,2] of the new event given the history before it).
    """

    def __init__(self, enc: WindowEncoder):
        super().__init__()
        self.enc = enc

    def forward(self, event_type, features, length, prev_embedding):
        last = (length - 1).clamp(min=0)
        emb = self.enc(event_type, features, last)
        t_new = event_type.gather(1, last.view(-1, 1)).squeeze(1)
        f_new = features.gather(1, last.view(-1, 1, 1).expand(-1, 1, features.shape[-1])).squeeze(1)
        return emb, self.enc.surprise(prev_embedding, t_new, f_new)


def export_window_onnx(enc: WindowEncoder, path: str, opset: int = 17) -> None:
    cfg = enc.cfg
    B, N = 4, cfg.window
    args = (torch.zeros(B, N, dtype=torch.int64), torch.zeros(B, N, cfg.n_features),
            torch.full((B,), N, dtype=torch.int64), torch.zeros(B, cfg.d_model))
    names_in = ["event_type", "features", "length", "prev_embedding"]
    names_out = ["embedding", "surprise"]
    with torch.no_grad():
        torch.onnx.export(WindowStep(enc).eval(), args, path, input_names=names_in, output_names=names_out,
                          dynamic_axes={n: {0: "batch"} for n in names_in + names_out},
                          opset_version=opset, dynamo=False)


# --------------------------------------------------------------------------- data layout

def user_sequences(user_idx: np.ndarray, n_users: int) -> list[np.ndarray]:
    """Replay positions of each user's events, in order (as training.train.user_sequences)."""
    by_user = np.argsort(user_idx, kind="stable")
    counts = np.bincount(user_idx, minlength=n_users)
    return np.split(by_user, np.cumsum(counts)[:-1])


def _chunks(seqs: list[np.ndarray], N: int, rng: np.random.Generator | None):
    """Training chunks (user, start, end), each at most N events; a random phase per user and epoch
    so that events are seen at different window positions. Every event t >= 1 is the target of
    exactly one position (t-1) per epoch; first events are predicted from the zero vector, as the
    LSTM predicts them from its zero initial state."""
    out = []
    for u, s in enumerate(seqs):
        L = len(s)
        o = int(rng.integers(0, N)) if (rng is not None and L > N) else 0
        starts = ([0] if o else []) + list(range(o, L, N))
        for a, b in zip(starts, starts[1:] + [L]):
            out.append((u, a, b))
    return out


def _pack(seqs, chunks, N: int):
    """-> inputs [B,N] replay positions, input mask, targets [B,N], target mask, first-event positions."""
    B = len(chunks)
    idx = np.zeros((B, N), np.int64)
    tgt = np.zeros((B, N), np.int64)
    in_m = np.zeros((B, N), bool)
    tg_m = np.zeros((B, N), bool)
    first = []
    for r, (u, a, b) in enumerate(chunks):
        s = seqs[u]
        idx[r, :b - a] = s[a:b]
        in_m[r, :b - a] = True
        t = s[a + 1:b + 1]
        tgt[r, :len(t)] = t
        tg_m[r, :len(t)] = True
        if a == 0:
            first.append(s[0])
    return idx, in_m, tgt, tg_m, np.array(first, np.int64)


# --------------------------------------------------------------------------- training

def train_transformer(cfg: TransformerTrainConfig, n_types: int, type_ids: np.ndarray, feats: np.ndarray,
                      seqs: list[np.ndarray], log=print) -> tuple[WindowEncoder, list[float], dict]:
    """Self-supervised next-event training on non-overlapping windows of each user's history."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    mcfg = cfg.model or TransformerConfig(n_types=n_types, n_features=feats.shape[1])
    if mcfg.n_types != n_types or mcfg.n_features != feats.shape[1]:
        mcfg = TransformerConfig(**{**mcfg.to_dict(), "n_types": n_types, "n_features": feats.shape[1]})
    enc = WindowEncoder(mcfg)
    enc.set_normalisation(feats.mean(axis=0), feats.std(axis=0))
    N = mcfg.window
    opt = torch.optim.AdamW(enc.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps, 1)))
    t_type, t_feat = torch.from_numpy(type_ids), torch.from_numpy(feats)
    rng = np.random.default_rng(cfg.seed)
    deadline = time.time() + cfg.max_train_minutes * 60
    zero = torch.zeros(1, mcfg.d_model)
    losses: list[float] = []
    steps, t0, stopped = 0, time.time(), False
    enc.train()
    for epoch in range(cfg.epochs):
        chunks = _chunks(seqs, N, rng)
        perm = rng.permutation(len(chunks))
        ep_loss, ep_n = 0.0, 0
        for a in range(0, len(perm), cfg.batch_windows):
            batch = [chunks[i] for i in perm[a:a + cfg.batch_windows]]
            idx, in_m, tgt, tg_m, first = _pack(seqs, batch, N)
            T = int(in_m.sum(1).max())
            idx, tgt, tg_m = idx[:, :T], tgt[:, :T], tg_m[:, :T]
            h = enc(t_type[idx], t_feat[idx])
            m = torch.from_numpy(tg_m).float()
            nll = (enc.surprise(h, t_type[tgt], t_feat[tgt]).sum(-1) * m).sum()
            n = float(m.sum())
            if len(first):
                nll = nll + enc.surprise(zero.expand(len(first), -1), t_type[first], t_feat[first]).sum()
                n += len(first)
            loss = nll / max(n, 1.0)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(enc.parameters(), 1.0)
            opt.step()
            sched.step()
            steps += 1
            ep_loss += float(loss.detach()) * n
            ep_n += int(n)
            if time.time() > deadline:
                stopped = True
                break
        losses.append(ep_loss / max(ep_n, 1))
        log(f"transformer epoch {epoch + 1}: mean surprise (type + gap NLL) {losses[-1]:.4f} "
            f"({steps} steps, {time.time() - t0:.0f}s)")
        if stopped:
            log(f"stopped early: the {cfg.max_train_minutes} min training budget is spent")
            break
    enc.eval()
    info = {"steps": steps, "seconds": round(time.time() - t0, 1), "stopped_early": stopped,
            "epochs_done": len(losses), "params": n_params(enc)}
    return enc, losses, info


# --------------------------------------------------------------------------- offline encoding

@torch.no_grad()
def encode_windows(enc: WindowEncoder, user_idx: np.ndarray, type_ids: np.ndarray, feats: np.ndarray,
                   n_users: int, batch: int = 512, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Embedding [n,D] and surprise [n,2] of every event (replay order), each event's embedding
    computed over its own window [t-N+1, t].

    The first N events of a user share one causal forward (position t of a causal stack over
    events 0..N-1 IS the window [0, t] read out at t); every later event gets its own full window.
    """
    N = enc.cfg.window
    seqs = user_sequences(np.asarray(user_idx, np.int64), n_users)
    t_type, t_feat = torch.from_numpy(np.asarray(type_ids, np.int64)), torch.from_numpy(np.asarray(feats, np.float32))
    n = len(user_idx)
    emb = np.zeros((n, enc.cfg.d_model), np.float32)
    heads = [s[:N] for s in seqs if len(s)]
    full = [np.lib.stride_tricks.sliding_window_view(s, N)[1:] for s in seqs if len(s) > N]
    full = np.concatenate(full) if full else np.zeros((0, N), np.int64)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, desc="encode (transformer)", unit="ev", mininterval=1.0, leave=False)
    for a in range(0, len(heads), batch):
        hs = heads[a:a + batch]
        idx = np.zeros((len(hs), N), np.int64)
        m = np.zeros((len(hs), N), bool)
        for r, s in enumerate(hs):
            idx[r, :len(s)], m[r, :len(s)] = s, True
        h = enc(t_type[idx], t_feat[idx]).numpy()
        emb[idx[m]] = h[m]
        if bar is not None:
            bar.update(int(m.sum()))
    for a in range(0, len(full), batch):
        w = full[a:a + batch]
        emb[w[:, -1]] = enc(t_type[w], t_feat[w], torch.full((len(w),), N - 1, dtype=torch.int64)).numpy()
        if bar is not None:
            bar.update(len(w))
    if bar is not None:
        bar.close()
    prev = np.full(n, -1, np.int64)                  # the same user's previous event, -1 for a first one
    for s in seqs:
        prev[s[1:]] = s[:-1]
    surprise = np.empty((n, 2), np.float32)
    for a in range(0, n, 65536):
        sl = slice(a, a + 65536)
        p = prev[sl]
        h_prev = torch.from_numpy(np.where((p >= 0)[:, None], emb[np.maximum(p, 0)], 0.0).astype(np.float32))
        surprise[sl] = enc.surprise(h_prev, t_type[sl], t_feat[sl]).numpy()
    return emb, surprise


# --------------------------------------------------------------------------- persistence

def save(enc: WindowEncoder, out_dir: str | Path, pca_mean, pca, extra: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"config": enc.cfg.to_dict(), "state_dict": enc.state_dict(),
                "pca_mean": torch.from_numpy(np.asarray(pca_mean)), "pca": torch.from_numpy(np.asarray(pca))},
               out / MODEL_FILE)           # tensors only, so loading needs no pickle (weights_only=True)
    (out / "metadata.json").write_text(json.dumps({"encoder": enc.cfg.to_dict(), **extra}, indent=2))
    return out / MODEL_FILE


def load(model_dir: str | Path) -> tuple[WindowEncoder, np.ndarray, np.ndarray]:
    d = torch.load(Path(model_dir) / MODEL_FILE, weights_only=True)
    enc = WindowEncoder(TransformerConfig(**d["config"]))
    enc.load_state_dict(d["state_dict"])
    return enc.eval(), np.asarray(d["pca_mean"]), np.asarray(d["pca"])


def train_on_log(events_path: str, artifact_dir: str, out_dir: str, cfg: TransformerTrainConfig,
                 log=print) -> Path:
    """Train on a log with the LSTM artifact's featuriser (same vocabulary, same features), fit the
    PCA as train.py does, and save to out_dir."""
    from seqguard.artifact import ModelArtifact
    from seqguard.batch import dense_user_index
    from seqguard.detector import fit_pca
    from seqguard.featurizer import ContextStore, featurize_log
    from seqguard.schema import read_events
    t0 = time.time()
    art = ModelArtifact.load(artifact_dir)
    events = list(read_events(events_path))
    order, type_ids, feats = featurize_log(art.featurizer, events, ContextStore(), progress=True)
    feats = np.ascontiguousarray(feats[:, :art.encoder_features])     # the LSTM's inputs, no detector-only ones
    user_idx, users = dense_user_index(events, order)
    seqs = user_sequences(user_idx, len(users))
    log(f"featurised {len(events)} events of {len(users)} users ({time.time() - t0:.0f}s)")
    n_types = int(torch.load(Path(artifact_dir) / "encoder.pt", weights_only=True)["config"]["n_types"])
    enc, losses, info = train_transformer(cfg, n_types, type_ids, feats, seqs, log)
    sample = np.random.default_rng(cfg.seed).permutation(len(seqs))[:cfg.pca_users]
    rows = np.concatenate([seqs[u][:512] for u in sample])
    sub_users = np.repeat(np.arange(len(sample)), [len(seqs[u][:512]) for u in sample])
    emb, _ = encode_windows(enc, sub_users, type_ids[rows], feats[rows], len(sample))
    pca_mean, pca = fit_pca(emb, cfg.pca_dim)
    cfg_d = asdict(cfg)
    path = save(enc, out_dir, pca_mean, pca, {
        "events_file": events_path, "artifact": artifact_dir, "events": len(events), "users": len(users),
        "epoch_losses": losses, **info, "train_config": cfg_d, "total_seconds": round(time.time() - t0, 1)})
    log(f"wrote {path} ({info['params']} parameters, {time.time() - t0:.0f}s)")
    return path


# --------------------------------------------------------------------------- online cost

def measure_latency(lstm_dir: str, tf_dir: str, batches=(1, 64), threads: int = 1, reps: int = 200,
                    seed: int = 0) -> dict:
    """Median wall time of ONE event update for `b` users at once, each encoder as it would serve:
    the LSTM step (state in, state out) vs the Transformer recomputing its full N-event window.
    Both in torch and in ONNX Runtime (the serving runtime), same thread count."""
    import tempfile

    import onnxruntime as ort

    from .model import EncoderConfig, StepModel
    torch.set_num_threads(threads)
    d = torch.load(Path(lstm_dir) / "encoder.pt", weights_only=True)
    lstm = SequenceEncoder(EncoderConfig(**d["config"]))
    lstm.load_state_dict(d["state_dict"])
    lstm_step = StepModel(lstm.eval()).eval()
    tf, _, _ = load(tf_dir)
    tf_step = WindowStep(tf).eval()
    rng = np.random.default_rng(seed)
    F_, H, D, N = lstm.cfg.n_features, lstm.cfg.hidden, tf.cfg.d_model, tf.cfg.window
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="seqguard_lat_") as tmp:
        export_window_onnx(tf, str(Path(tmp) / "window.onnx"))
        s_tf = ort.InferenceSession(str(Path(tmp) / "window.onnx"), so, providers=["CPUExecutionProvider"])
    s_lstm = ort.InferenceSession(str(Path(lstm_dir) / "model.onnx"), so, providers=["CPUExecutionProvider"])

    def timeit(fn):
        for _ in range(10):
            fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return 1e6 * float(np.median(ts))

    out: dict = {"threads": threads, "window": N, "reps": reps,
                 "params": {"lstm": n_params(lstm), "transformer": n_params(tf)}}
    for b in batches:
        ty = rng.integers(1, lstm.cfg.n_types, size=(b, 1))
        fe = rng.normal(size=(b, F_)).astype(np.float32)
        hh = rng.normal(size=(b, H)).astype(np.float32)
        wty = rng.integers(1, tf.cfg.n_types, size=(b, N))
        wfe = rng.normal(size=(b, N, F_)).astype(np.float32)
        ln = np.full(b, N, np.int64)
        pe = rng.normal(size=(b, D)).astype(np.float32)
        tl = [torch.from_numpy(x) for x in (ty, fe, hh, hh)]
        tt = [torch.from_numpy(x) for x in (wty, wfe, ln, pe)]
        with torch.no_grad():
            r = {"lstm_torch_us": timeit(lambda: lstm_step(*tl)),
                 "transformer_torch_us": timeit(lambda: tf_step(*tt)),
                 "lstm_ort_us": timeit(lambda: s_lstm.run(None, {"event_type": ty, "features": fe, "h_in": hh,
                                                                 "c_in": hh})),
                 "transformer_ort_us": timeit(lambda: s_tf.run(None, {"event_type": wty, "features": wfe,
                                                                      "length": ln, "prev_embedding": pe}))}
        out[str(b)] = r
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="train the Transformer challenger encoder / measure its latency")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--events", default="data/train20k.jsonl")
    t.add_argument("--artifact", default="runs/m20k_p64", help="LSTM artifact whose featuriser/vocabulary is used")
    t.add_argument("--out", default="runs/tf20k")
    t.add_argument("--epochs", type=int, default=TransformerTrainConfig.epochs)
    t.add_argument("--max-minutes", type=float, default=TransformerTrainConfig.max_train_minutes)
    t.add_argument("--threads", type=int, default=1)
    lt = sub.add_parser("latency")
    lt.add_argument("--lstm", default="runs/m20k_p64")
    lt.add_argument("--transformer", default="runs/tf20k")
    lt.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.cmd == "train":
        train_on_log(args.events, args.artifact, args.out,
                     TransformerTrainConfig(epochs=args.epochs, max_train_minutes=args.max_minutes,
                                            threads=args.threads), log)
    else:
        print(json.dumps(measure_latency(args.lstm, args.transformer, threads=args.threads), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
