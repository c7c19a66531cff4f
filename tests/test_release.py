"""`airatings release`: resumes the latest unfinished run from its status (no new export), a
second release at once exits 0 saying why, and a finished run is left as it is."""

from __future__ import annotations

from train_fixtures import FAST, make_world, run_status

from jobs import db, release


def test_release_resumes_an_unfinished_run_from_its_status(make_cfg):
    cfg = make_cfg(**FAST, evaluate__bootstrap_samples=100, evaluate__min_test_rows=10)
    db.migrate(cfg)
    # a run the cache step finished (status 'cached'), as a release killed in training leaves it
    world = make_world(cfg, n=120)
    assert release.unfinished_run(cfg).model_version == world["model_version"]

    out = release.run(cfg)
    assert out["status"] == "released" and out["resumed"] is True
    assert out["model_version"] == world["model_version"]
    assert out["steps"]["export"]["status"] == "resumed"  # no dbt, no new export
    assert [
        out["steps"][s]["status"] for s in ("train", "evaluate", "export-onnx", "register")
    ] == [
        "trained",
        "evaluated",
        "onnx_exported",
        "registered",
    ]
    assert run_status(cfg, world["run_id"])[0] == "registered"
    assert out["promotion"] is None  # not asked to promote
    assert release.unfinished_run(cfg) is None

    # another config's unfinished run is not this release's to resume
    other = make_cfg(**{**FAST, "train__epochs": 3})
    assert release.unfinished_run(other) is None


def test_a_second_release_at_once_exits_zero_saying_why(make_cfg):
    cfg = make_cfg(**FAST)
    db.migrate(cfg)
    world = make_world(cfg, n=40)
    with db.job_lock(cfg, "release") as held:
        assert held
        out = release.run(cfg)
    assert out["status"] == "skipped" and "another 'airatings release'" in out["reason"]
    assert run_status(cfg, world["run_id"])[0] == "cached"  # nothing moved
