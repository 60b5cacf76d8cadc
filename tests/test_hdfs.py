"""The HDFS benchmark's mapping (training/hdfs.py): sessions -> schema-v1 JSONL + session labels."""
import json

import numpy as np
import pytest

from seqguard.schema import ReadReport, read_events
from seqguard.training import hdfs

pytestmark = pytest.mark.slow


def test_mapping_is_schema_valid_and_labels_align(tmp_path):
    limit = 40                                        # the first 40 sessions of each vendored file
    normal = hdfs.read_sessions(hdfs.DATA_DIR / hdfs.NORMAL_FILE)[:limit]
    abnormal = hdfs.read_sessions(hdfs.DATA_DIR / hdfs.ABNORMAL_FILE)[:limit]
    cfg = hdfs.SplitConfig(seed=3, validation_normal=5, test_normal=10, validation_abnormal_frac=0.25)
    paths = hdfs.prepare(tmp_path, cfg, limit=limit)

    by_split = {}
    for split, (events_path, labels_path) in paths.items():
        report = ReadReport()
        events = list(read_events(str(events_path), on_bad_row="error", report=report))   # raises on a bad row
        labels = [json.loads(line) for line in open(labels_path)]
        assert not report.skipped and report.kept == report.rows == sum(1 for _ in open(events_path))
        users_in_order = list(dict.fromkeys(e.user_id for e in events))    # each session one contiguous block
        assert users_in_order == [l["user_id"] for l in labels]
        assert len({e.event_id for e in events}) == len(events)
        ts = np.array([e.ts for e in events])
        assert (np.diff(ts) > 0).all()                # global time order, 1 s within a session
        seqs = {}
        for e in events:
            seqs.setdefault(e.user_id, []).append(int(e.event_type.removeprefix("hdfs_k")))
        by_split[split] = [(tuple(seqs[l["user_id"]]), l["label"]) for l in labels]

    assert [len(by_split[s]) for s in ("train", "validation", "test")] == [25, 5 + 10, 10 + 30]
    assert sum(lab for _, lab in by_split["validation"]) == 10 and sum(lab for _, lab in by_split["test"]) == 30
    assert all(lab == 0 for _, lab in by_split["train"])
    # every source session appears exactly once, under its own label
    mapped = sorted(s for rows in by_split.values() for s in rows)
    assert mapped == sorted([(tuple(k), 0) for k in normal] + [(tuple(k), 1) for k in abnormal])
    # seeded: the same split twice, another seed a different one
    again = hdfs.split_sessions(normal, abnormal, cfg)
    assert [(tuple(k), y) for k, y in again["test"]] == by_split["test"]
    other = hdfs.split_sessions(normal, abnormal, hdfs.SplitConfig(seed=4, validation_normal=5, test_normal=10,
                                                                  validation_abnormal_frac=0.25))
    assert [(tuple(k), y) for k, y in other["test"]] != by_split["test"]


def test_session_metrics_on_known_scores():
    y = np.array([0] * 100 + [1] * 10)
    s = np.r_[np.arange(100) / 100.0, [0.995] * 9 + [0.5]]     # 9 positives above every negative
    m = hdfs.session_metrics(y, s)
    assert m["recall_at_0.01_fpr"] == pytest.approx(0.9)
    assert m["fpr_at_that_cutoff"] <= 0.01
    assert m["best_f1"] == pytest.approx(2 * 0.9 / 1.9)       # precision 1, recall 0.9
    assert 0.9 < m["roc_auc"] < 1.0
