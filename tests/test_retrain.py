"""`seqguard retrain`: candidate trained on the earlier part of a new log, compared on its latest part."""
import json

import pytest

from seqguard.cli import main

pytestmark = pytest.mark.slow


def test_retrain_compares_candidate_with_live(small_model, tmp_path):
    from seqguard.training.generate import generate, write_events, write_labels
    events, labels = generate(200, seed=23, days=10)
    write_events(events, tmp_path / "new.jsonl")
    write_labels(labels, tmp_path / "new_labels.jsonl")
    out = tmp_path / "cand"
    rc = main(["retrain", "--live", str(small_model), "--events", str(tmp_path / "new.jsonl"),
               "--labels", str(tmp_path / "new_labels.jsonl"), "--out", str(out),
               "--epochs", "1", "--trees", "30", "--holdout-frac", "0.3"])
    assert rc == 0
    r = json.loads((out / "retrain_report.json").read_text())
    assert r["fit_events"] + r["holdout_events"] == len(events)
    assert r["holdout_events"] >= 0.25 * len(events)
    live, cand = r["live"], r["candidate"]
    assert live["model_version"] != cand["model_version"]
    for m in (live, cand):                      # both scored the same hold-out, with labels
        assert m["events"] == r["holdout_events"]
        assert 0.5 < m["roc_auc"] <= 1.0
        assert set(m["alert_rate"]) == {"REVIEW", "CHALLENGE", "BLOCK"}
        assert m["alert_rate"]["REVIEW"] >= m["alert_rate"]["CHALLENGE"] >= m["alert_rate"]["BLOCK"]
    assert isinstance(r["recommend_candidate"], bool) and "ROC-AUC" in r["reason"]
    assert "Recommendation" in (out / "retrain_report.md").read_text()
    # the candidate is a complete artifact with its own Triton entry
    assert (out / "model_repository").is_dir() and (out / "metadata.json").is_file()


def test_retrain_rejects_a_log_too_short_to_split(small_model, tmp_path):
    from seqguard.training.retrain import split_by_time
    from seqguard.schema import Event
    with pytest.raises(ValueError, match="too short"):
        split_by_time([Event("e1", "u1", 1_700_000_000_000, "login")], 0.2)
