"""The LSTM sequence encoder, in two forms that share one set of weights.

* SequenceEncoder.forward runs whole histories (training, parity checks) with nn.LSTM.
* StepModel runs ONE event for a batch of users: (event_type, features, h, c) ->
  (h', c', embedding, surprise). This is what is exported to ONNX and served by Triton, so
  serving keeps (h, c) per user and does O(1) work per event.

Self-supervision: from the state *before* event t the model predicts event t's type
(softmax) and its log time gap (Gaussian). The negative log-likelihoods of what actually
happened are the training loss and, at serving time, the "surprise" signals (DeepLog-style).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqguard.step_contract import INPUT_NAMES, OUTPUT_NAMES

GAP_FEATURE = 1          # index of log_gap_s in seqguard.featurizer.FEATURE_NAMES


@dataclass
class EncoderConfig:
    n_types: int                 # vocabulary size (id 0 = unknown)
    n_features: int = 40
    hidden: int = 128
    type_dim: int = 16

    def to_dict(self) -> dict:
        return asdict(self)


class SequenceEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.type_emb = nn.Embedding(cfg.n_types, cfg.type_dim)
        self.lstm = nn.LSTM(cfg.type_dim + cfg.n_features, cfg.hidden, batch_first=True)
        self.type_head = nn.Linear(cfg.hidden, cfg.n_types)
        self.gap_head = nn.Linear(cfg.hidden, 2)          # mean and log-variance of log gap
        # feature standardisation, fitted on training data and baked into the exported graph
        self.register_buffer("feat_mean", torch.zeros(cfg.n_features))
        self.register_buffer("feat_inv_std", torch.ones(cfg.n_features))

    def set_normalisation(self, mean, std) -> None:
        self.feat_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.feat_inv_std.copy_(1.0 / torch.clamp(torch.as_tensor(std, dtype=torch.float32), min=1e-3))

    def inputs(self, type_ids: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        x = (feats - self.feat_mean) * self.feat_inv_std
        return torch.cat([self.type_emb(type_ids), x], dim=-1)

    def surprise(self, h_prev: torch.Tensor, type_ids: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """[..., 2]: NLL of the event's type and of its log gap, given the state before it."""
        logp = F.log_softmax(self.type_head(h_prev), dim=-1)
        type_nll = -logp.gather(-1, type_ids.unsqueeze(-1)).squeeze(-1)
        mu, logvar = self.gap_head(h_prev).unbind(-1)
        logvar = logvar.clamp(-6.0, 6.0)
        g = feats[..., GAP_FEATURE]
        gap_nll = 0.5 * (logvar + (g - mu) ** 2 * torch.exp(-logvar) + math.log(2 * math.pi))
        return torch.stack([type_nll, gap_nll], dim=-1)

    def forward(self, type_ids: torch.Tensor, feats: torch.Tensor, state=None):
        """type_ids [B,T], feats [B,T,F] -> (h_seq [B,T,H], surprise [B,T,2], (h, c))."""
        B = type_ids.shape[0]
        if state is None:
            z = feats.new_zeros(1, B, self.cfg.hidden)
            state = (z, z)
        h_seq, (h, c) = self.lstm(self.inputs(type_ids, feats), state)
        h_prev = torch.cat([state[0][0].unsqueeze(1), h_seq[:, :-1]], dim=1)
        return h_seq, self.surprise(h_prev, type_ids, feats), (h, c)


class StepModel(nn.Module):
    """One LSTM step with the encoder's weights, written with plain ops so it exports cleanly."""

    def __init__(self, enc: SequenceEncoder):
        super().__init__()
        self.enc = enc

    def forward(self, event_type, features, h_in, c_in):
        enc = self.enc
        t = event_type[:, 0]
        x = enc.inputs(t, features)
        lstm = enc.lstm
        gates = x @ lstm.weight_ih_l0.T + lstm.bias_ih_l0 + h_in @ lstm.weight_hh_l0.T + lstm.bias_hh_l0
        i, f, g, o = gates.chunk(4, dim=1)
        c_out = torch.sigmoid(f) * c_in + torch.sigmoid(i) * torch.tanh(g)
        h_out = torch.sigmoid(o) * torch.tanh(c_out)
        surprise = enc.surprise(h_in, t, features)
        return h_out, c_out, h_out, surprise


def export_onnx(enc: SequenceEncoder, path: str, opset: int = 17) -> None:
    """Write the step graph with only the batch dimension dynamic (the Triton contract)."""
    step = StepModel(enc).eval()
    cfg = enc.cfg
    B = 4
    args = (torch.zeros(B, 1, dtype=torch.int64), torch.zeros(B, cfg.n_features),
            torch.zeros(B, cfg.hidden), torch.zeros(B, cfg.hidden))
    with torch.no_grad():
        torch.onnx.export(step, args, path, input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                          dynamic_axes={n: {0: "batch"} for n in INPUT_NAMES + OUTPUT_NAMES},
                          opset_version=opset, dynamo=False)
