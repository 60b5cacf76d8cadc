"""`score-file --engine ray` on a local 2-CPU Ray cluster gives exactly the single-machine output."""
from __future__ import annotations

import numpy as np
import pytest

from seqguard.artifact import ModelArtifact
from seqguard.batch import score_events, write_scores_csv
import reference_featurizer as ref
from seqguard.featurizer import ENTITY_FEATURES_START, N_ENTITY_FEATURES, featurize_log
from seqguard.schema import read_events

ray = pytest.importorskip("ray", reason="the optional `scale` extra (Ray) is not installed")


@pytest.fixture(scope="module")
def local_ray():
    # Ray waits a fixed 30 s for its raylet to register; on the 2 shared cores, late in a full
    # suite run, that start-up missed the window once (fresh-clone run, 2026-11-24; the same tests
    # pass alone in 15 s). One more start, after a clean shutdown, before calling it a failure.
    for attempt in (1, 2):
        try:
            ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
            break
        except Exception as e:                       # noqa: BLE001  (Ray raises a bare Exception here)
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
    try:
        yield ray
    finally:
        ray.shutdown()


def _sequential_entity_features(fz, events):
    """The sequential replay's cross-user features by the per-event Python featuriser (the test
    oracle the kernel replaced), kept as float64 (featurize_log rounds to float32)."""
    old = ref.Featurizer(fz.vocab, fz.hasher)
    store = ref.ContextStore()
    out = []
    for i in sorted(range(len(events)), key=lambda i: (events[i].ts, i)):
        t = old.tokens(events[i])
        u, d, ip, p = store.contexts_for(t)
        ent = ref.entity_features(t, u.n == 0, d, ip, p)
        old.featurize_user(t, u, ent)
        out.append(ent)
    return np.array(out, np.float64)


@pytest.mark.slow
def test_distributed_entity_pass_equals_sequential_replay(local_ray, small_model, small_log):
    from seqguard.ray_engine import distributed_entity_features
    events = list(read_events(str(small_log[0])))
    fz = ModelArtifact.load(small_model).featurizer
    ref_order, _, ref_feats = featurize_log(fz, events)
    ref = _sequential_entity_features(fz, events)
    assert np.count_nonzero(ref[:, 0]) > len(events) // 2          # devices really counted
    for parts in (1, 5):
        order, _, entity = distributed_entity_features(local_ray, fz, events, parts=parts)
        assert np.array_equal(order, ref_order)
        assert np.array_equal(entity, ref)
        cols = slice(ENTITY_FEATURES_START, ENTITY_FEATURES_START + N_ENTITY_FEATURES)
        assert np.array_equal(entity.astype(np.float32), ref_feats[:, cols])


@pytest.mark.slow
def test_ray_score_file_csv_identical_to_local(local_ray, small_model, small_log, tmp_path):
    from seqguard.ray_engine import RayConfig, score_events_ray
    events = list(read_events(str(small_log[0])))
    model = ModelArtifact.load(small_model)
    risk_ref, act_ref, _ = score_events(model, events)
    risk, act = score_events_ray(model, events, RayConfig(partitions=3))
    assert ray.is_initialized()                      # it used the caller's cluster and left it running
    write_scores_csv(str(tmp_path / "local.csv"), events, risk_ref, act_ref, model.model_version)
    write_scores_csv(str(tmp_path / "ray.csv"), events, risk, act, model.model_version)
    assert (tmp_path / "ray.csv").read_bytes() == (tmp_path / "local.csv").read_bytes()
    assert np.array_equal(risk, risk_ref) and np.array_equal(act, act_ref)
    assert len(set(act.tolist())) > 1                # not a degenerate all-ALLOW output
