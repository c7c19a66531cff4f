"""The dbt project on a real PostgreSQL: build + tests + unit tests, gates, splits, docs."""

from __future__ import annotations

import hashlib
import json

import pytest
from export_fixtures import grow_world, world
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs import db, dbt_runner
from jobs.errors import ConfigError, InputError


@pytest.fixture(scope="module")
def built(pg_server, tmp_path_factory):
    """One seeded world, built and tested once, shared by the read-only tests below."""
    with world(pg_server, tmp_path_factory.mktemp("dbtworld")) as (cfg, planted):
        summary = dbt_runner.build(cfg)
        yield cfg, planted, summary


def _rows(cfg, query, params=()):
    with db.connect(cfg) as conn:
        return conn.execute(query, params).fetchall()


def test_build_passes_with_data_tests_unit_tests_and_singular_test(built):
    cfg, _, summary = built
    assert set(summary["results"]) <= {"pass", "success"}
    results = json.loads((dbt_runner.target_path(cfg) / "run_results.json").read_text())["results"]
    by_id = {r["unique_id"]: r["status"] for r in results}
    unit = {k: v for k, v in by_id.items() if k.startswith("unit_test.")}
    assert {k.rsplit(".", 1)[1] for k in unit} == {
        "test_labels_resolved_precedence",
        "test_label_candidates_gates",
        "test_dataset_splits_by_webcam_day",
        "test_dataset_splits_by_snapshot",
    }
    assert set(unit.values()) == {"pass"}
    assert by_id["test.airatings.assert_no_split_group_in_two_splits"] == "pass"
    assert any(k.startswith("test.airatings.source_unique_app_webcam_snapshots_id") for k in by_id)


def test_gates_drop_each_planted_fault_for_its_reason(built):
    cfg, planted, _ = built
    reasons = dict(_rows(cfg, "select snapshot_id, drop_reason from ml.fct_label_candidates"))
    for reason in (
        "missing_url",
        "url_scheme_not_allowed",
        "url_malformed",
        "too_few_ratings",
        "duplicate_snapshot",
    ):
        assert planted[reason], reason
        assert {reasons[i] for i in planted[reason]} == {reason}, reason
    trainable = {r[0] for r in _rows(cfg, "select snapshot_id from ml.fct_training_samples")}
    assert trainable == {i for i, r in reasons.items() if r is None}


def test_latest_non_superseded_review_wins(built):
    cfg, _, _ = built
    rows = dict(
        (r[0], r[1:])
        for r in _rows(
            cfg,
            "select snapshot_id, label_source, label_value, calculated_rating"
            " from ml.fct_label_candidates where snapshot_id in (2, 4)",
        )
    )
    assert rows[2][:2] == ("manual_review", 4.5)
    # snapshot 4's only review was superseded: the app's rating stands
    assert rows[4][0] == "calculated_rating" and rows[4][1] == rows[4][2]


def test_duplicate_rating_rows_count_once(built):
    cfg, _, _ = built
    # seed_world wrote snapshot 1's first rating twice; the app's rating_count is the truth
    (agg, app) = _rows(
        cfg,
        "select a.rating_count, s.rating_count from ml.int_ratings_aggregated_to_snapshots a"
        " join public.webcam_snapshots s on s.id = a.snapshot_id where a.snapshot_id = 1",
    )[0]
    raw = _rows(cfg, "select count(*) from public.webcam_snapshot_ratings where snapshot_id = 1")[
        0
    ][0]
    assert raw == app + 1 and agg == app


def test_split_is_md5_of_seed_and_webcam_day(built):
    cfg, _, _ = built
    d = cfg.dataset
    rows = _rows(
        cfg,
        "select webcam_id, to_char(captured_at at time zone 'UTC', 'YYYY-MM-DD'), split_group, split"
        " from ml.fct_dataset_splits",
    )
    assert len(rows) > 200
    for webcam_id, day, group, split in rows:
        assert group == f"webcam:{webcam_id}:{day}"
        bucket = int(hashlib.md5(f"{d.split_seed}:{group}".encode()).hexdigest()[:8], 16) / 2**32
        r = d.split_ratios
        want = "train" if bucket < r.train else "val" if bucket < r.train + r.val else "test"
        assert split == want
    groups: dict[str, set[str]] = {}
    for _, _, group, split in rows:
        groups.setdefault(group, set()).add(split)
    assert all(len(s) == 1 for s in groups.values())
    assert {s for v in groups.values() for s in v} == {"train", "val", "test"}


def test_docs_generate_works_offline(built):
    cfg, _, _ = built
    summary = dbt_runner.cli(cfg, ["docs", "generate"])
    target = dbt_runner.target_path(cfg)
    assert (target / "index.html").exists()
    catalog = json.loads((target / "catalog.json").read_text())
    assert "model.airatings.fct_dataset_splits" in catalog["nodes"]
    manifest = json.loads((target / "manifest.json").read_text())
    types = {e["type"] for e in manifest["exposures"].values()}
    assert types == {"ml", "application"}
    assert summary["docs"].endswith("index.html")

    # The lineage the docs draw: app sources -> staging -> marts -> each exposure (the training
    # export, the app's cron scorer, the review loop).
    parents = manifest["parent_map"]

    def upstream(node: str) -> set[str]:
        seen, todo = set(), [node]
        while todo:
            for p in parents.get(todo.pop(), []):
                if p not in seen:
                    seen.add(p)
                    todo.append(p)
        return seen

    exposures = {e["name"]: uid for uid, e in manifest["exposures"].items()}
    assert {"training_export", "app_cron_scorer", "review_loop"} <= set(exposures)
    for name in ("training_export", "app_cron_scorer", "review_loop"):
        above = upstream(exposures[name])
        sources = {n for n in above if n.startswith("source.airatings.app.")}
        marts = {n for n in above if n.startswith("model.") and ".fct_" in n}
        staging = {n for n in above if n.startswith("model.") and ".stg_app__" in n}
        assert {
            "source.airatings.app.webcam_snapshots",
            "source.airatings.app.webcam_snapshot_ratings",
        } <= sources, name
        assert marts and staging, name


def test_vars_are_rechecked_before_reaching_sql(built):
    cfg, _, _ = built
    bad = cfg.model_copy(
        update={
            "database": cfg.database.model_copy(update={"app_schema": 'public"; drop table x; --'})
        }
    )
    with pytest.raises(ConfigError, match="database.app_schema"):
        dbt_runner.checked_vars(bad)
    with pytest.raises(InputError, match="--vars"):
        dbt_runner.cli(cfg, ["build", "--vars", "{}"])


@pytest.fixture(scope="module")
def growing(pg_server, tmp_path_factory):
    with world(pg_server, tmp_path_factory.mktemp("growing"), snapshots=200) as (cfg, _):
        dbt_runner.run_models(cfg)
        yield cfg


def _splits(cfg) -> dict[int, str]:
    return dict(_rows(cfg, "select snapshot_id, split from ml.fct_dataset_splits"))


@settings(
    max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(min_value=3, max_value=10_000), fraction=st.sampled_from([0.1, 0.15]))
def test_old_snapshots_keep_their_split_when_data_grows(growing, seed, fraction):
    cfg = growing
    before = _splits(cfg)
    added = grow_world(cfg, fraction=fraction, seed=seed)
    dbt_runner.run_models(cfg)
    after = _splits(cfg)
    assert len(after) >= len(before) + added["new_snapshots"] // 2
    assert set(before) <= set(after)
    changed = [i for i in before if before[i] != after[i]]
    assert changed == []


def _dbt_lock_is_free(cfg) -> bool:
    with db.job_lock(cfg, "dbt", cfg.database.dbt_schema) as free:
        return free


def test_dbt_commands_that_replace_relations_hold_the_dbt_lock(built, monkeypatch):
    """`airatings dbt run/build` must not swap marts under an export that is reading what its
    own build just tested: they take the same lock the export holds."""
    cfg, _, _ = built
    seen = {}

    class Ok:
        success, exception, result = True, None, None

    def fake_invoke(cfg_, args, **kw):
        seen[args[0]] = _dbt_lock_is_free(cfg_)
        return Ok()

    monkeypatch.setattr(dbt_runner, "invoke", fake_invoke)
    for command in (["run", "--select", "x"], ["build"], ["seed"], ["ls"], ["compile"]):
        dbt_runner.cli(cfg, command)
    assert seen == {"run": False, "build": False, "seed": False, "ls": True, "compile": True}
    assert _dbt_lock_is_free(cfg)


def test_interrupt_inside_dbt_is_not_reported_as_a_dbt_failure():
    """dbtRunner.invoke returns BaseExceptions as result.exception: a SIGTERM (Terminated)
    must stay exit 75, not become 'dbt stopped' (exit 2, never retried)."""
    from jobs.errors import Terminated

    class Res:
        success, result = False, None

    for exc in (Terminated("received signal 15"), KeyboardInterrupt()):
        res = Res()
        res.exception = exc
        with pytest.raises(type(exc)):
            dbt_runner._raise_for(res, "dbt build", dbt_runner.PROJECT_DIR)
    wrapped = RuntimeError("dbt wrapped it")
    wrapped.__context__ = Terminated("received signal 15")
    res = Res()
    res.exception = wrapped
    with pytest.raises(Terminated):
        dbt_runner._raise_for(res, "dbt build", dbt_runner.PROJECT_DIR)
    res.exception = RuntimeError("Compilation Error in model x")
    with pytest.raises(InputError, match="dbt stopped"):
        dbt_runner._raise_for(res, "dbt build", dbt_runner.PROJECT_DIR)


def test_sigterm_during_dbt_build_exits_75(pg_server, tmp_path):
    """docs/faults.md 3 through the real CLI: SIGTERM while dbt runs models -> exit 75 in < 30 s."""
    import os
    import signal
    import subprocess
    import time

    from conftest import AIRATINGS, BASELINE

    with world(pg_server, tmp_path, snapshots=40) as (cfg, _):
        env = {
            **os.environ,
            "DATABASE_URL": cfg.database.url,
            "AIR_DATA_DIR": str(cfg.paths.data_dir),
            "AIR_ARTIFACTS_DIR": str(cfg.paths.artifacts_dir),
        }
        proc = subprocess.Popen(
            [AIRATINGS, "dbt", "build", "--config", str(BASELINE), "--json"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            for line in proc.stderr:  # dbt's console output goes to stderr
                if " START " in line:
                    break
            else:
                pytest.fail(f"dbt never started a node (exit {proc.wait()})")
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            out, err = proc.communicate(timeout=30)
            assert time.monotonic() - t0 < 30
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 75, err[-2000:]
        assert json.loads(out.strip().splitlines()[-1])["exit_code"] == 75


def test_missing_dbt_project_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("AIR_DBT_PROJECT_DIR", str(tmp_path))
    with pytest.raises(InputError, match="no dbt project at .*AIR_DBT_PROJECT_DIR"):
        dbt_runner.project_dir()


def test_dbt_sessions_carry_the_same_timeouts(make_cfg):
    """dbt-postgres has no ``options`` key: the settings reach its sessions through PGOPTIONS."""
    cfg = make_cfg(database__statement_timeout_s=2.5, database__lock_timeout_s=4)
    query = "select current_setting('statement_timeout') as s, current_setting('lock_timeout') as l"
    res = dbt_runner.invoke(cfg, ["show", "--inline", query], quiet=True)
    assert res.success, res.exception
    assert tuple(res.result.results[0].agate_table.rows[0]) == ("2500ms", "4s")
    env = dbt_runner.profile_env(cfg)
    assert env["AIR_DBT_KEEPALIVES_IDLE"] == "30" and env["AIR_DBT_CONNECT_TIMEOUT"] == "10"


DBT_BACKENDS = (
    "select pg_terminate_backend(pid) from pg_stat_activity"
    " where application_name = 'dbt' and datname = current_database()"
)


def _build_while_killing_dbt(cfg, pg_server, start_killing: str | None) -> None:
    """``dbt_runner.build`` while another session terminates every dbt backend, from the start
    (``start_killing=None``) or once a dbt session waits on a lock this helper holds on the
    table ``start_killing``: the database lost mid-build, for real."""
    import threading
    import time

    from conftest import with_dbname
    from psycopg.conninfo import conninfo_to_dict

    url = with_dbname(pg_server, conninfo_to_dict(cfg.database.url)["dbname"])
    stop = threading.Event()
    ready = threading.Event()

    def killer() -> None:
        with db.connect(url, autocommit=True) as conn:
            with conn.transaction():
                if start_killing:
                    conn.execute(f"lock table {start_killing} in access exclusive mode")
                ready.set()
                while start_killing and not stop.is_set():
                    waiting = conn.execute(
                        "select count(*) from pg_stat_activity where application_name = 'dbt'"
                        " and wait_event_type = 'Lock' and datname = current_database()"
                    ).fetchone()[0]
                    if waiting:
                        break
                    time.sleep(0.01)
                conn.execute(DBT_BACKENDS)
            while not stop.is_set():
                conn.execute(DBT_BACKENDS)
                time.sleep(0.02)

    t = threading.Thread(target=killer)
    t.start()
    ready.wait()
    try:
        dbt_runner.build(cfg)
    finally:
        stop.set()
        t.join()


@pytest.mark.parametrize("start_killing", [None, "public.webcams"])
def test_database_lost_mid_build_is_transient(pg_server, tmp_path, start_killing):
    """docs/faults.md 28: whether dbt stops on the lost connection (DbtDatabaseError, "server
    closed the connection unexpectedly") or nodes fail on it ("terminating connection due to
    administrator command"), the build is exit 75 (retried), never 2 (a data problem)."""
    from jobs.errors import TransientError

    with world(pg_server, tmp_path, snapshots=40) as (cfg, _):
        with pytest.raises(TransientError, match="dbt lost PostgreSQL") as info:
            _build_while_killing_dbt(cfg, pg_server, start_killing)
        assert info.value.exit_code == 75
        # and the next build, with the database back, passes
        assert set(dbt_runner.build(cfg)["results"]) <= {"pass", "success"}


def test_dbt_build_against_a_dead_server_exits_75_without_a_traceback(tmp_path):
    import os
    import socket
    import subprocess

    from conftest import AIRATINGS, BASELINE

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "DATABASE_URL": f"postgresql://u:pw-not-shown@127.0.0.1:{port}/db",
        "AIR_DATA_DIR": str(tmp_path / "data"),
        "AIR_ARTIFACTS_DIR": str(tmp_path / "art"),
    }
    # build takes the dbt lock first (our connection fails); show goes straight to dbt
    for args in (["build"], ["show", "--inline", "select 1 as x"]):
        r = subprocess.run(
            [AIRATINGS, "dbt", *args, "--config", str(BASELINE), "--json"],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert r.returncode == 75, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
        assert json.loads(r.stdout.strip().splitlines()[-1])["exit_code"] == 75
        assert "pw-not-shown" not in r.stdout + r.stderr
