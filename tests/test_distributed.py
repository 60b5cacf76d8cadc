"""Data-parallel training: `torchrun --nproc-per-node 2 -m seqguard.cli train` with 2 CPU processes (gloo)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from seqguard.training.distributed import rank_schedule

pytestmark = pytest.mark.slow


def test_rank_schedule_gives_every_rank_the_same_number_of_steps():
    perm = np.random.default_rng(0).permutation
    steps = rank_schedule(7, 2, perm)
    assert len(steps) == 4 and all(len(s) == 2 for s in steps)
    got = sorted(b for s in steps for b in s if b is not None)
    assert got == list(range(7))                      # every batch exactly once
    assert sum(s.count(None) for s in steps) == 1     # the odd one out runs masked windows
    # single process: one batch per step, the epoch permutation unchanged
    assert [s[0] for s in rank_schedule(5, 1, np.random.default_rng(1).permutation)] == \
        list(np.random.default_rng(1).permutation(5))


def test_torchrun_two_cpu_processes_train_one_model(small_log, tmp_path):
    events, _, _ = small_log
    out, digest = tmp_path / "model", tmp_path / "weights"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", SEQGUARD_DDP_WEIGHTS_DIGEST=str(digest))
    cmd = [str(torchrun), "--nproc-per-node", "2", "--standalone", "-m", "seqguard.cli", "train",
           "--events", str(events), "--out", str(out), "--epochs", "1", "--hidden", "32", "--trees", "30"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # both ranks trained on their own batches ...
    assert "rank 0/2: trained on" in r.stderr and "rank 1/2: trained on" in r.stderr
    w0 = int(r.stderr.split("rank 0/2: trained on ")[1].split()[0])
    w1 = int(r.stderr.split("rank 1/2: trained on ")[1].split()[0])
    assert w0 > 0 and w1 > 0
    # ... and DDP kept their weights identical
    d0, d1 = (Path(f"{digest}.{k}").read_text() for k in (0, 1))
    assert d0 == d1
    # rank 0 wrote a complete artifact that scores
    from seqguard.artifact import ModelArtifact
    from seqguard.batch import score_events
    from seqguard.schema import read_events
    evs = list(read_events(str(events)))
    art = ModelArtifact.load(out)
    risk, _, _ = score_events(art, evs[:2000])
    assert np.isfinite(risk).all() and 0 <= risk.min() and risk.max() <= 1 and risk.std() > 0
