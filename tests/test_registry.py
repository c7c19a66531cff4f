"""The registry: promotion by compare-and-set with its history, the gates (parity, a stale or
worse comparison, force with a reason), rollback, list/show, and the database refusing to
change or delete a registered version (migration 0040's triggers).

Runs come from the real train, evaluate and export-onnx jobs (tests/registry_fixtures.py),
cloned per test into a fresh database. The "worse" comparison is the one place where
evaluate's output is written by the test: a tiny world gives no reliably worse model, so the
test writes the ``production`` section evaluate would write (and records its sha256 the way
evaluate does).
"""

from __future__ import annotations

import json

import psycopg
import pytest
from psycopg import sql
from registry_fixtures import registry_for_test, row_of, set_param, shared_exported_world

import jobs.evaluate
from jobs import db, paths, registry, runs
from jobs import register as register_job
from jobs.artifacts import sha256_file
from jobs.errors import InputError, TransientError

A, B, C = "reg_a_2026_02_01", "reg_b_2026_02_02", "reg_c_2026_02_03"


@pytest.fixture(scope="module")
def base(request, pg_server, tmp_path_factory):
    return shared_exported_world(request, pg_server, tmp_path_factory)


@pytest.fixture
def reg(pg_server, tmp_path, base, monkeypatch):
    monkeypatch.setenv("AIR_ACTOR", "alice")
    with registry_for_test(pg_server, tmp_path, base) as r:
        yield r


def _registered(reg, *versions):
    for v in versions:
        reg.clone(v)
        assert register_job.run(reg.cfg, run_ref=v)["status"] == "registered"


def _history(cfg):
    with db.connect(cfg) as conn:
        return registry.history(conn, cfg, alias="production")


def _production(cfg):
    with db.connect(cfg) as conn:
        return registry.current(conn, cfg)


def test_promote_needs_a_fresh_comparison_then_rollback_goes_back(reg):
    cfg = reg.cfg
    _registered(reg, A, B)

    first = registry.promote(cfg, A)
    assert first["status"] == "promoted" and first["previous"] is None
    assert first["comparison"]["note"] == "no production model yet"
    assert first["changed_by"] == "alice" and first["forced"] is False
    # evaluate's own query finds it (the shape it reads: model_aliases.alias/model_version)
    with db.connect(cfg) as conn:
        assert jobs.evaluate.production_version(cfg, conn) == (A, "ok")
    assert registry.promote(cfg, A)["status"] == "already_production"

    # B was evaluated when there was no production: its comparison is stale
    with pytest.raises(InputError) as refused:
        registry.promote(cfg, B)
    assert (
        f"its evaluation compared it with no production model, but production is now {A} "
        f"(stale comparison): re-run 'airatings evaluate --run {B}'" in str(refused.value)
    )
    assert _production(cfg) == A and len(_history(cfg)) == 1

    # evaluated again (the run is registered: evaluate may still add its record), now against A
    jobs.evaluate.run(cfg, run_ref=B)
    assert row_of(cfg, B)["status"] == "registered"
    compared = json.loads(paths.of(cfg).run(B).metrics.read_text())["production"]
    assert compared["model_version"] == A
    assert compared["verdict"] == "no detectable difference"  # the same weights
    out = register_job.run(cfg, run_ref=B, promote=True)
    assert out["status"] == "already_registered"
    assert out["promotion"]["status"] == "promoted" and out["promotion"]["previous"] == A
    assert out["promotion"]["comparison"]["paired"]["verdict"] == "no detectable difference"

    listed = registry.list_models(cfg)
    assert listed["production"] == B and listed["registered"] == 2
    by_version = {m["model_version"]: m for m in listed["models"]}
    assert by_version[B]["aliases"] == ["production"] and by_version[A]["aliases"] == []
    assert by_version[A]["registered"] and by_version[A]["metrics"]["mae"] > 0

    back = registry.rollback(cfg, reason="B breaks the cron")
    assert back["status"] == "rolled_back" and back["model_version"] == A and back["previous"] == B
    assert _production(cfg) == A
    moves = _history(cfg)
    assert [(m["action"], m["from_version"], m["to_version"]) for m in moves] == [
        ("promote", None, A),
        ("promote", A, B),
        ("rollback", B, A),
    ]
    assert moves[-1]["reason"] == "B breaks the cron" and moves[-1]["changed_by"] == "alice"
    assert moves[1]["comparison"]["gate"] == "passed"
    with pytest.raises(InputError, match=f"production {A} was the first production model"):
        registry.rollback(cfg)

    shown = registry.show(cfg, A)
    assert shown["integrity"] == "verified" and shown["aliases"] == ["production"]
    assert shown["card"]["sha256"] == row_of(cfg, A)["artifact_sha256"]
    assert [m["id"] for m in shown["history"]] == [m["id"] for m in moves]


def _evaluated_against(cfg, run_id, version, production, comparison):
    """B's metrics.json as evaluate writes it after comparing with ``production``."""
    path = paths.of(cfg).run(version).metrics
    result = json.loads(path.read_text())
    result["production"] = {"model_version": production, "note": "ok", **comparison}
    path.write_text(json.dumps(result, indent=2, sort_keys=True))
    set_param(cfg, run_id, ["evaluate", "metrics_sha256"], sha256_file(path))


def test_a_worse_model_is_refused_with_the_comparison_and_force_records_why(reg):
    cfg = reg.cfg
    _registered(reg, A, B)
    registry.promote(cfg, A)
    worse = {
        "verdict": "worse",
        "mae_model": 0.9,
        "mae_other": 0.5,
        "mae_diff": 0.4,
        "ci_low": 0.2,
        "ci_high": 0.6,
        "n": 24,
    }
    _evaluated_against(cfg, row_of(cfg, B)["id"], B, A, worse)

    expected = (
        f"refusing to promote {B} over {A}: its paired comparison with production {A} is "
        f"worse: MAE 0.9000 vs 0.5000, difference +0.4000 (CI 0.2, 0.6; n=24). To promote "
        f"anyway: --force --reason TEXT (recorded)"
    )
    with pytest.raises(InputError) as refused:
        registry.promote(cfg, B)
    assert str(refused.value) == expected
    with pytest.raises(InputError) as refused:
        register_job.run(cfg, run_ref=B, promote=True)
    assert str(refused.value) == (
        f"{B} is registered (already_registered) but was not promoted: {expected}"
    )
    for reason in (None, "", "   "):
        with pytest.raises(InputError, match="--force needs --reason TEXT"):
            registry.promote(cfg, B, force=True, reason=reason)
    assert _production(cfg) == A and len(_history(cfg)) == 1

    out = registry.promote(cfg, B, force=True, reason="  A mislabels night frames ")
    assert out["status"] == "promoted" and out["forced"] is True
    last = _history(cfg)[-1]
    assert (last["from_version"], last["to_version"], last["forced"]) == (A, B, True)
    assert last["reason"] == "A mislabels night frames" and last["changed_by"] == "alice"
    assert last["comparison"]["gate"] == "overridden"
    assert last["comparison"]["paired"] == worse
    assert _production(cfg) == B

    # too few rows to compare is refused too (forcible, like worse)
    _registered(reg, C)
    _evaluated_against(cfg, row_of(cfg, C)["id"], C, B, {"status": "insufficient_data", "n": 3})
    with pytest.raises(InputError, match=f"comparison with {B} has too little data \\(3 rows\\)"):
        registry.promote(cfg, C)


def test_what_no_force_overrides(reg):
    cfg = reg.cfg
    reg.clone(C)  # exported, not registered
    with pytest.raises(InputError, match=f"model version {C} is not registered"):
        registry.promote(cfg, C, force=True, reason="urgent")
    # the database agrees: an alias cannot point at an unregistered version
    with db.connect(cfg) as conn, pytest.raises(psycopg.errors.CheckViolation) as exc:
        conn.execute(
            sql.SQL("insert into {} (alias, model_version, updated_by) values (%s, %s, %s)").format(
                runs.table(cfg, "model_aliases")
            ),
            ("production", C, "mallory"),
        )
    assert exc.value.diag.message_primary == (
        f"alias production cannot point at {C}: that version is not registered"
    )

    _registered(reg, A)
    paths.of(cfg).run(A).metrics.unlink()  # its evaluation can no longer be checked
    with pytest.raises(InputError, match="metrics.json is missing or not the file evaluate"):
        registry.promote(cfg, A, force=True, reason="urgent")
    assert _production(cfg) is None and _history(cfg) == []


def test_compare_and_set_refuses_a_stale_expectation(reg):
    cfg = reg.cfg
    _registered(reg, A, B)
    registry.promote(cfg, A)

    def move(expected, to):
        return registry.move_alias(
            cfg,
            "production",
            expected=expected,
            to_version=to,
            action="promote",
            reason=None,
            forced=False,
            comparison=None,
        )

    # decided while there was no production, someone promoted A meanwhile
    with pytest.raises(TransientError) as exc:
        move(None, B)
    assert exc.value.exit_code == 75
    assert "'production' moved while this promote was decided: it was not set, it is now " in str(
        exc.value
    )
    # decided against A, someone moved it to B meanwhile
    move(A, B)
    with pytest.raises(TransientError, match=f"it was {A}, it is now {B}; nothing changed"):
        move(A, A)
    assert _production(cfg) == B
    assert [(m["from_version"], m["to_version"]) for m in _history(cfg)] == [(None, A), (A, B)]


def test_the_database_refuses_to_change_or_delete_a_registered_version(reg):
    cfg = reg.cfg
    _registered(reg, A)
    reg.clone(B)  # not registered: free to change
    run_id = row_of(cfg, A)["id"]
    t = runs.table(cfg, "model_training_runs")
    immutable = (
        f"model version {A} is registered: its identity, artifact and registration record "
        f"are immutable"
    )
    refused = [
        (
            "update {} set status = 'failed' where id = %s",
            f"model version {A} is registered: its status cannot become failed",
        ),
        ("update {} set artifact_sha256 = repeat('0', 64) where id = %s", immutable),
        ("update {} set artifact_path = 'models/x/model.onnx' where id = %s", immutable),
        ("update {} set model_version = 'reg_other_version' where id = %s", immutable),
        ("update {} set dataset_hash = 'e' where id = %s", immutable),
        ("update {} set config_hash = 'e' where id = %s", immutable),
        ("update {} set params_json = params_json - 'register' where id = %s", immutable),
        (
            "update {} set params_json = jsonb_set(params_json, '{{onnx,parity,passed}}', 'false')"
            " where id = %s",
            immutable,
        ),
        (
            "delete from {} where id = %s",
            f"model version {A} is registered: its row cannot be deleted",
        ),
    ]
    for statement, message in refused:
        with db.connect(cfg) as conn, pytest.raises(psycopg.errors.RestrictViolation) as exc:
            conn.execute(sql.SQL(statement).format(t), (run_id,))
        assert exc.value.diag.message_primary == message, statement
    with db.connect(cfg) as conn, pytest.raises(psycopg.errors.RestrictViolation) as exc:
        conn.execute(sql.SQL("truncate {} cascade").format(t))
    assert exc.value.diag.message_primary == (
        "model_training_runs holds registered versions: it cannot be truncated"
    )
    # through the code path too: a registered run is never marked failed
    with db.connect(cfg) as conn, pytest.raises(psycopg.errors.RestrictViolation):
        runs.mark_failed(conn, cfg, run_id, "oops")

    # what other steps may still do: notes, a fresh evaluation record (status stays)
    evaluation = row_of(cfg, A)["params"]["evaluate"] | {"rerun": True}
    with db.connect(cfg) as conn:
        conn.execute(sql.SQL("update {} set notes = 'reviewed' where id = %s").format(t), (run_id,))
        runs.set_status(conn, cfg, run_id, "evaluated", step="evaluate", summary=evaluation)
    row = row_of(cfg, A)
    assert row["status"] == "registered" and row["params"]["evaluate"] == evaluation
    # 'registered' needs its artifact recorded
    with db.connect(cfg) as conn, pytest.raises(psycopg.errors.CheckViolation) as exc:
        conn.execute(
            sql.SQL("update {} set status = 'registered' where model_version = %s").format(t), (B,)
        )
    assert exc.value.diag.constraint_name == "model_training_runs_registered_check"
    with db.connect(cfg) as conn:
        conn.execute(sql.SQL("delete from {} where model_version = %s").format(t), (B,))

    # the alias history is append-only, and a forced move carries a reason
    registry.promote(cfg, A)
    h = runs.table(cfg, "model_alias_history")
    for statement in ("update {} set reason = 'edited'", "delete from {}", "truncate {}"):
        with db.connect(cfg) as conn, pytest.raises(psycopg.errors.RestrictViolation) as exc:
            conn.execute(sql.SQL(statement).format(h))
        assert exc.value.diag.message_primary.startswith("model_alias_history is append-only")
    with db.connect(cfg) as conn, pytest.raises(psycopg.errors.CheckViolation) as exc:
        conn.execute(
            sql.SQL(
                "insert into {} (alias, action, from_version, to_version, changed_by, forced)"
                " values ('production', 'promote', %s, %s, 'x', true)"
            ).format(h),
            (A, A),
        )
    assert exc.value.diag.constraint_name == "model_alias_history_forced_reason"
    assert len(_history(cfg)) == 1


def test_before_the_registry_migration_every_command_says_to_migrate(make_cfg):
    cfg = make_cfg()
    db.migrate(cfg, files=[f for f in db.migration_files() if f[0] < 40])
    for call in (
        lambda: registry.list_models(cfg),
        lambda: registry.show(cfg, A),
        lambda: registry.promote(cfg, A),
        lambda: registry.rollback(cfg),
        lambda: registry.load_verified(cfg, A),
        lambda: register_job.run(cfg, run_ref=A),
    ):
        with pytest.raises(
            InputError, match="registry tables do not exist yet: run 'airatings migrate'"
        ):
            call()
