"""The worlds harness end to end on one tiny world (generate -> train -> score-file -> rules -> table)."""
from __future__ import annotations

import json

import pytest

from seqguard.training.worlds import FAMILIES, METRICS, main, parse_range, summarise


def test_parse_range():
    assert parse_range("0-3") == [0, 1, 2, 3]
    assert parse_range("100-102,7") == [7, 100, 101, 102]
    with pytest.raises(ValueError):
        parse_range("3-1")


def test_summarise_takes_the_worst_world_and_margin():
    def res(k, s, r):
        fam = {"bot_scraping": s}
        return {"world": k, "scores": {"seqguard": {**{m: s for m, _ in METRICS}, "families": fam},
                                       "hand_rules": {**{m: r for m, _ in METRICS}, "families": {"bot_scraping": r}}}}
    out = summarise([res(0, 0.9, 0.5), res(1, 0.6, 0.7), res(2, 0.8, 0.1)])
    assert out["pay_auc"]["seqguard"]["worst"] == 0.6 and out["pay_auc"]["seqguard"]["worst_world"] == 1
    assert out["pay_auc"]["hand_rules"]["worst_world"] == 2
    assert out["pay_auc"]["worst_margin"]["world"] == 1
    assert out["pay_auc"]["worst_margin"]["worlds_below_rules"] == [1]
    assert abs(out["family:bot_scraping"]["seqguard"]["mean"] - 2.3 / 3) < 1e-9


@pytest.mark.slow
def test_harness_end_to_end_one_tiny_world(tmp_path):
    out = tmp_path / "run"
    argv = ["--worlds", "1", "--design", "1", "--users", "250", "--test-users", "150", "--out", str(out),
            "--train-args", "--epochs 1 --trees 20 --hidden 16"]
    rc = main(argv)
    assert rc == 0
    md = (out / "worlds.md").read_text()
    report = json.loads((out / "worlds.json").read_text())
    (res,) = report["results"]
    assert res["world"] == 1 and res["design"] is True
    assert "Design worlds (used to choose the design): [1]; in this table: [1]" in md
    for name in ("seqguard", "hand_rules"):
        s = res["scores"][name]
        assert 0.0 <= s["pay_auc"] <= 1.0 and 0.0 <= s["user_auc"] <= 1.0
        assert set(s["families"]) <= set(FAMILIES) and s["families"]
    # scored through the CLI: one risk per test event, and the world's config travelled with the logs
    scores = (out / "w1" / "scores.csv").read_text().splitlines()
    assert len(scores) - 1 == res["data"]["test_events"]
    assert (tmp_path / "worlds_data" / "w1" / "test_u150.world.json").exists()
    # a second run reuses the finished world instead of retraining it; other train args retrain it
    mtime = (out / "w1" / "result.json").stat().st_mtime
    assert main(argv) == 0
    assert (out / "w1" / "result.json").stat().st_mtime == mtime
    assert main(argv[:-1] + ["--epochs 1 --trees 10 --hidden 16"]) == 0
    assert json.loads((out / "w1" / "result.json").read_text())["train_args"][-3] == "10"


def test_a_failing_world_is_reported_not_lost(tmp_path):
    out = tmp_path / "run"
    rc = main(["--worlds", "2", "--design", "0", "--users", "60", "--test-users", "40", "--out", str(out),
               "--train-args=--no-such-flag"])
    assert rc == 1
    report = json.loads((out / "worlds.json").read_text())
    assert report["results"] == [] and [f["world"] for f in report["failed"]] == [2]
    md = (out / "worlds.md").read_text()
    assert "Worlds where a step failed" in md and "world 2:" in md
