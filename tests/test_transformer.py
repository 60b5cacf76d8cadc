"""training.transformer: the Transformer challenger trains, is causal, and its batch encoding equals its online window."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from seqguard.training.transformer import (TransformerConfig, TransformerTrainConfig, WindowEncoder, WindowStep,
                                  encode_windows, train_transformer, user_sequences)

N = 8


@pytest.fixture(scope="module")
def tiny():
    """A generated 120-user log, featurised in replay order with the shared featuriser."""
    from seqguard.batch import dense_user_index
    from seqguard.featurizer import ContextStore, Featurizer, TokenHasher, Vocabulary, featurize_log
    from seqguard.schema import events_from_dicts
    from seqguard.training.generate import generate
    events = events_from_dicts(generate(120, seed=7, days=4)[0])
    vocab = Vocabulary.learn((e.event_type for e in events), 5)
    order, type_ids, feats = featurize_log(Featurizer(vocab, TokenHasher()), events, ContextStore())
    user_idx, users = dense_user_index(events, order)
    return len(vocab), type_ids, feats, user_idx, len(users)


@pytest.fixture(scope="module")
def trained(tiny):
    n_types, type_ids, feats, user_idx, n_users = tiny
    torch.manual_seed(0)
    cfg = TransformerTrainConfig(epochs=3, batch_windows=32, warmup_steps=5, threads=1,
                                 model=TransformerConfig(n_types=n_types, d_model=32, d_ff=64, n_layers=2, window=N))
    enc, losses, info = train_transformer(cfg, n_types, type_ids, feats, user_sequences(user_idx, n_users),
                                          log=lambda m: None)
    return enc, losses, info


def test_trains_and_loss_falls(trained):
    enc, losses, info = trained
    assert info["steps"] > 20 and not info["stopped_early"]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses


def test_embeddings_are_causal(trained, tiny):
    """Changing event k (inputs or type) leaves every earlier embedding and surprise bit-identical."""
    enc, _, _ = trained
    n_types, type_ids, feats, user_idx, n_users = tiny
    ty = torch.from_numpy(type_ids[:N])[None]
    f = torch.from_numpy(feats[:N])[None]
    with torch.no_grad():
        h = enc(ty, f)
        f2, ty2 = f.clone(), ty.clone()
        f2[0, 5] += 3.0
        ty2[0, 5] = (ty2[0, 5] + 1) % n_types
        h2 = enc(ty2, f2)
    assert torch.equal(h[0, :5], h2[0, :5])
    assert not torch.allclose(h[0, 5:], h2[0, 5:])
    # through the whole-log encoder: perturb one user's later event
    seqs = user_sequences(user_idx, n_users)
    s = max(seqs, key=len)
    k = 3 * N
    emb, sur = encode_windows(enc, user_idx, type_ids, feats, n_users)
    feats2 = feats.copy()
    feats2[s[k]] += 2.0
    emb2, sur2 = encode_windows(enc, user_idx, type_ids, feats2, n_users)
    before = s[:k]
    assert np.array_equal(emb[before], emb2[before]) and np.array_equal(sur[before], sur2[before])
    assert not np.allclose(emb[s[k]], emb2[s[k]])
    # the window is N events: event k's change is forgotten N events later
    assert np.allclose(emb[s[k + N:]], emb2[s[k + N:]], atol=1e-5)


def test_log_encoding_equals_online_window_step(trained, tiny):
    """encode_windows (offline) == WindowStep over [t-N+1, t] with the previous embedding (online)."""
    enc, _, _ = trained
    n_types, type_ids, feats, user_idx, n_users = tiny
    emb, sur = encode_windows(enc, user_idx, type_ids, feats, n_users)
    step = WindowStep(enc)
    s = max(user_sequences(user_idx, n_users), key=len)[:3 * N]
    prev = torch.zeros(1, enc.cfg.d_model)
    for t in range(len(s)):
        w = s[max(0, t - N + 1):t + 1]
        ty = np.zeros((1, N), np.int64)
        fe = np.zeros((1, N, feats.shape[1]), np.float32)
        ty[0, :len(w)], fe[0, :len(w)] = type_ids[w], feats[w]
        with torch.no_grad():
            e, su = step(torch.from_numpy(ty), torch.from_numpy(fe), torch.tensor([len(w)]), prev)
        assert np.allclose(e[0].numpy(), emb[s[t]], atol=1e-5)
        assert np.allclose(su[0].numpy(), sur[s[t]], atol=1e-4)
        prev = e


def test_parameter_count_is_comparable_to_the_lstm():
    from seqguard.training.model import EncoderConfig, SequenceEncoder
    from seqguard.training.transformer import n_params
    lstm = n_params(SequenceEncoder(EncoderConfig(n_types=20)))
    tf = n_params(WindowEncoder(TransformerConfig(n_types=20)))
    assert 0.8 * lstm < tf < 1.25 * lstm


def test_onnx_window_step_matches_torch(trained, tiny, tmp_path):
    """The graph the latency numbers are measured on computes what the torch model computes."""
    import onnxruntime as ort

    from seqguard.training.transformer import export_window_onnx
    enc, _, _ = trained
    n_types, type_ids, feats, _, _ = tiny
    export_window_onnx(enc, str(tmp_path / "w.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "w.onnx"), providers=["CPUExecutionProvider"])
    ty = type_ids[:3 * N].reshape(3, N)
    fe = feats[:3 * N].reshape(3, N, -1)
    ln = np.array([N, 3, 1], np.int64)              # full window, short history, first event
    pe = np.random.default_rng(0).normal(size=(3, enc.cfg.d_model)).astype(np.float32)
    got = sess.run(None, {"event_type": ty, "features": fe, "length": ln, "prev_embedding": pe})
    with torch.no_grad():
        want = WindowStep(enc)(*(torch.from_numpy(a) for a in (ty, fe, ln, pe)))
        full = enc(torch.from_numpy(ty), torch.from_numpy(fe))
    for g, w in zip(got, want):
        assert np.allclose(g, w.numpy(), atol=1e-5)
    assert np.allclose(got[0], full[torch.arange(3), torch.from_numpy(ln - 1)].numpy(), atol=1e-5)


def test_compare_encoders_section_on_small_model(small_log, small_model, tmp_path):
    """`python -m seqguard.training.compare --sections encoders`: same detector on both encoders, table + latency + verdict."""
    import json

    from seqguard.training.compare import main
    from seqguard.training.transformer import train_on_log
    ev, lab, _ = small_log
    tf_dir = tmp_path / "tf"
    train_on_log(str(ev), str(small_model), str(tf_dir),
                 TransformerTrainConfig(epochs=1, batch_windows=64, pca_dim=16, pca_users=100,
                                        model=TransformerConfig(n_types=1, d_model=32, d_ff=64, window=N)),
                 log=lambda m: None)
    out = tmp_path / "enc.md"
    assert main(["--model", str(small_model), "--fit-events", str(ev), "--fit-labels", str(lab),
                 "--events", str(ev), "--labels", str(lab), "--sections", "encoders", "--cache", str(tmp_path / "c"),
                 "--transformer-dir", str(tf_dir), "--encoder-out", str(out), "--out", str(tmp_path / "x.md")]) == 0
    assert not (tmp_path / "x.md").exists()            # only the encoder report is written
    md = out.read_text()
    for s in ("| LSTM step encoder", "| causal Transformer", "Online cost of one event update", "Conclusion"):
        assert s in md, s
    e = json.loads(out.with_suffix(".json").read_text())["encoders"]
    for k in ("lstm", "transformer"):
        m = e["rows"][k]
        assert 0 <= m["pay_roc_auc"] <= 1 and 0 <= m["user_roc_auc"] <= 1
    # its PCA-16 embedding, surprise, 24 signals, 2 signal-floor columns
    assert e["rows"]["transformer"]["dims"] == 16 + 2 + 24 + 2
    assert e["latency"]["64"]["transformer_ort_us"] > 0 and e["latency"]["1"]["lstm_ort_us"] > 0
