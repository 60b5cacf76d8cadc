"""`score-file` in bounded memory: a time-ordered log scored chunk by chunk gives the bytes of
scoring it whole, whatever the chunk size; a log out of order is detected and scored whole."""
import json
import subprocess
import sys

import numpy as np
import pytest

from seqguard.artifact import ModelArtifact
from seqguard.batch import NotInTimeOrder, StreamScorer, score_events, stream_scores_csv, write_scores_csv
from seqguard.schema import read_events


@pytest.fixture(scope="module")
def whole(small_model, small_log, tmp_path_factory):
    """The in-memory path's CSV for the test log (the reference bytes)."""
    model = ModelArtifact.load(small_model)
    events = list(read_events(str(small_log[0])))
    assert all(a.ts <= b.ts for a, b in zip(events, events[1:]))          # generated logs are in time order
    risk, actions, _ = score_events(model, events)
    path = tmp_path_factory.mktemp("whole") / "scores.csv"
    write_scores_csv(str(path), events, risk, actions, model.model_version)
    return model, events, path.read_bytes(), risk


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [1_000_000, 4096, 997, 64])
def test_stream_csv_identical_whatever_the_chunk_size(whole, tmp_path, chunk):
    model, events, ref, _ = whole
    out = tmp_path / "s.csv"
    n = stream_scores_csv(model, iter(events), str(out), chunk_events=chunk)
    assert n == len(events) and n > 10_000           # many chunks at the smaller sizes
    assert out.read_bytes() == ref
    assert not (tmp_path / "s.csv.tmp").exists()


@pytest.mark.slow
def test_stream_state_is_per_user_and_entity_not_per_event(whole):
    """What survives a chunk is sized by users and entities: the carried arrays hold one row per user."""
    model, events, _, risk_ref = whole
    scorer = StreamScorer(model)
    risks = [scorer.score(events[a:a + 5000])[0] for a in range(0, len(events), 5000)]
    assert np.array_equal(np.concatenate(risks), risk_ref)
    users = len({e.user_id for e in events})
    assert len(scorer.user_index) == users and len(scorer.h) < 2 * max(users, 1024)
    assert len(scorer.contexts.user_rows) == users


@pytest.mark.slow
def test_out_of_order_log_is_detected_and_scored_whole(whole, small_model, tmp_path):
    model, events, ref, _ = whole
    swapped = list(events)
    k = len(events) // 2
    swapped[k], swapped[k + 50] = swapped[k + 50], swapped[k]
    assert swapped[k].ts > swapped[k + 1].ts
    with pytest.raises(NotInTimeOrder) as err:
        stream_scores_csv(model, iter(swapped), str(tmp_path / "s.csv"), chunk_events=4096)
    assert err.value.position == k + 1
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "s.csv.tmp").exists()
    # the CLI falls back to the whole-log path: the same CSV as scoring that shuffled log in memory
    log = tmp_path / "swapped.jsonl"
    log.write_text("".join(json.dumps(e.to_dict()) + "\n" for e in swapped))
    out = tmp_path / "cli.csv"
    res = subprocess.run([sys.executable, "-m", "seqguard.cli", "score-file", "--model", str(small_model),
                          "--input", str(log), "--output", str(out), "--quiet", "--chunk-events", "3000"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "not in time order" in res.stderr
    risk, actions, _ = score_events(model, swapped)
    write_scores_csv(str(tmp_path / "mem.csv"), swapped, risk, actions, model.model_version)
    assert out.read_bytes() == (tmp_path / "mem.csv").read_bytes()
    # and a time-ordered log through the CLI streams (no fallback) to the reference bytes
    res = subprocess.run([sys.executable, "-m", "seqguard.cli", "score-file", "--model", str(small_model),
                          "--input", str(whole_log_path(events, tmp_path)), "--output", str(out), "--quiet",
                          "--chunk-events", "3000"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "not in time order" not in res.stderr
    assert out.read_bytes() == ref


def whole_log_path(events, tmp_path):
    p = tmp_path / "ordered.jsonl"
    p.write_text("".join(json.dumps(e.to_dict()) + "\n" for e in events))
    return p
