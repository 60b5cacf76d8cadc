"""Drift job: a fresh stream from the same generator is not flagged; shifted streams are."""
import json
import shutil

import pytest

from seqguard.cli import main as cli_main
from seqguard.schema import read_events
from seqguard.training.drift import REFERENCE_FILE, drift, psi
from seqguard.training.generate import generate, write_events


@pytest.fixture(scope="module")
def model_copy(small_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("drift_model") / "m"
    # without the training-time reference, so the tests below build one from a 1500-user stream
    shutil.copytree(small_model, d, ignore=shutil.ignore_patterns("model_repository", "encoder.pt", REFERENCE_FILE))
    return d


def _stream(tmp_path_factory, users, seed, days):
    path = tmp_path_factory.mktemp("drift_log") / "events.jsonl"
    write_events(generate(users, seed=seed, days=days)[0], path)
    return list(read_events(str(path)))


# user-level traits (devices, bots) make a few hundred users a noisy sample: compare populations of 1500
@pytest.fixture(scope="module")
def reference_stream(tmp_path_factory):
    return _stream(tmp_path_factory, 1500, 21, 4)


@pytest.fixture(scope="module")
def fresh_stream(tmp_path_factory):
    return _stream(tmp_path_factory, 1500, 22, 4)


def test_psi_basics():
    assert psi([0.5, 0.5], [0.5, 0.5]) == 0
    assert psi([0.5, 0.5], [0.9, 0.1]) > 0.2


def test_same_generator_not_flagged_shift_flagged(model_copy, reference_stream, fresh_stream):
    same = drift(model_copy, fresh_stream, reference_events=reference_stream, log=lambda m: None)
    assert (model_copy / REFERENCE_FILE).is_file()          # cached for the next run
    print(f"unshifted: score PSI {same.score_psi:.3f}, max feature PSI {max(same.feature_psi.values()):.3f}")
    assert not same.flagged, same.to_markdown()

    # amounts x5: payment-amount features and the risk score move
    amounts = [e._replace(amount=e.amount * 5) if e.amount is not None else e for e in fresh_stream]
    shifted = drift(model_copy, amounts, log=lambda m: None)       # the stored reference is reused
    print(f"amounts x5: score PSI {shifted.score_psi:.3f}, drifted {shifted.drifted_features[:5]}")
    assert shifted.flagged
    assert any("amount" in f for f in shifted.drifted_features), shifted.drifted_features

    # failure storm: every login and payment fails -> failure-count features and the score move
    fails = [e._replace(event_type={"login": "login_failed", "payment": "payment_failed"}.get(e.event_type,
                                                                                             e.event_type))
             for e in fresh_stream]
    failed = drift(model_copy, fails, log=lambda m: None)
    print(f"failure storm: score PSI {failed.score_psi:.3f}, drifted {failed.drifted_features[:5]}")
    assert failed.flagged


def test_cli_writes_report(model_copy, fresh_stream, tmp_path, capsys):
    ev = tmp_path / "live.jsonl"
    write_events([e._asdict() for e in fresh_stream], ev)
    out = tmp_path / "drift.md"
    rc = cli_main(["drift", "--model", str(model_copy), "--events", str(ev), "--out", str(out)])
    cap = capsys.readouterr()
    assert cap.out.strip(), cap.err[-2000:]
    summary = json.loads(cap.out.strip().splitlines()[-1])
    assert rc == 0 and summary["flagged"] is False
    assert "risk score" in out.read_text() and (tmp_path / "drift.json").is_file()


def test_training_writes_drift_reference(small_model, small_log, tmp_path, capsys):
    """`seqguard train` leaves drift_reference.json in the artifact: equal to the reference `seqguard drift
    --reference TRAINING_LOG` would build, so the drift job needs no --reference."""
    from seqguard.artifact import ModelArtifact
    from seqguard.training.drift import build_reference, load_reference, score_log
    stored = load_reference(small_model)
    assert stored is not None, "train did not write drift_reference.json"
    events = list(read_events(str(small_log[0])))
    rebuilt = build_reference(*score_log(ModelArtifact.load(small_model), events))
    assert stored["n"] == rebuilt["n"] == len(events)
    assert stored["risk"]["edges"] == pytest.approx(rebuilt["risk"]["edges"], abs=1e-9)
    assert stored["risk"]["shares"] == pytest.approx(rebuilt["risk"]["shares"], abs=1e-9)
    assert stored["features"].keys() == rebuilt["features"].keys()
    for name, ref in stored["features"].items():
        assert ref["edges"] == pytest.approx(rebuilt["features"][name]["edges"], abs=1e-6), name
        assert ref["shares"] == pytest.approx(rebuilt["features"][name]["shares"], abs=1e-9), name

    # the CLI without --reference: the training log itself is not drifted from its own reference
    model = tmp_path / "m"
    shutil.copytree(small_model, model, ignore=shutil.ignore_patterns("model_repository", "encoder.pt"))
    rc = cli_main(["drift", "--model", str(model), "--events", str(small_log[0])])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and summary["flagged"] is False and summary["score_psi"] < 1e-6
