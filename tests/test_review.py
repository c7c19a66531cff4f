"""`airatings review import`: a review CSV is validated whole (rejected with every bad row
listed, nothing written), spreadsheet formulas are neutralised, accepted labels go to
manual_relabels (superseding earlier ones) with the review accounting, and the same file twice
is "already imported". The report, the page and the history run on the demo world in
tests/test_lifecycle.py."""

from __future__ import annotations

import json

import pytest
from export_fixtures import create_app_tables
from psycopg import sql

from jobs import db, review
from jobs.errors import InputError

V = "rv_v2_2026_01_01"
HEADER = "snapshot_id,label,reviewer,cycle,model_version,note\n"


def _t(cfg, name, schema=None):
    return sql.SQL("{}.{}").format(
        sql.Identifier(schema or cfg.database.ml_schema), sql.Identifier(name)
    )


@pytest.fixture
def world(cfg):
    """Five snapshots; 1-3 in a review set of cycle c1 (1 a flagged top disagreement: AI 4.5,
    label 1.0; 2 in the boundary band; 3 the holdout); 4 never reviewed."""
    create_app_tables(cfg)
    app = cfg.database.app_schema
    with db.connect(cfg) as conn:
        conn.execute(
            sql.SQL("insert into {} (id, name) values (1, 'cam')").format(_t(cfg, "webcams", app))
        )
        for sid in range(1, 6):
            conn.execute(
                sql.SQL(
                    "insert into {} (id, webcam_id, firebase_url, captured_at) values (%s, 1, 'x', now())"
                ).format(_t(cfg, "webcam_snapshots", app)),
                (sid,),
            )
        conn.execute(
            sql.SQL(
                "insert into {} (model_version, status, dataset_hash, config_hash) values"
                " (%s, 'cached', %s, %s)"
            ).format(_t(cfg, "model_training_runs")),
            (V, "d" * 64, cfg.config_hash),
        )
        conn.execute(
            sql.SQL(
                "insert into {} (cycle, model_version, data_path, data_sha256, slices_sha256,"
                " items_sha256) values ('c1', %s, 'x', 'x', 'x', 'x')"
            ).format(_t(cfg, "review_cycles")),
            (V,),
        )
        for sid, reason, ai, label in (
            (1, "top_disagreement", 4.5, 1.0),
            (2, "boundary_sample", 3.9, 4.2),
            (3, "holdout", 2.0, 2.0),
        ):
            conn.execute(
                sql.SQL(
                    "insert into {} (cycle, model_version, snapshot_id, reason, item_rank, ai_rating,"
                    " label_value, abs_error) values ('c1', %s, %s, %s, 1, %s, %s, %s)"
                ).format(_t(cfg, "review_items")),
                (V, sid, reason, ai, label, abs(ai - label)),
            )
    db.migrate(cfg)  # the app's tables exist now: the roles' grants on them
    return cfg


def _relabels(cfg):
    with db.connect(cfg) as conn:
        return conn.execute(
            sql.SQL(
                "select snapshot_id, label_value, reviewer, reason, superseded_at is null,"
                " review_import_id from {} order by id"
            ).format(_t(cfg, "manual_relabels"))
        ).fetchall()


def test_import_writes_relabels_with_the_accounting_once(world, tmp_path):
    cfg = world
    f = tmp_path / "review.csv"
    f.write_text(
        HEADER
        + f"1,4.5,ana,c1,{V},sky was great\n"  # the model was right: a label error
        + f"2,3.5,ana,c1,{V},\n"  # crosses 4.0 downwards
        + f"3,2,ana,c1,{V},\n"  # unchanged
    )
    out = review.import_job(cfg, f)
    assert out["status"] == "imported" and out["rows"] == 3
    acc = out["accounting"]
    assert acc["reviewed"] == 3 and acc["changed"] == 2 and acc["yield"] == pytest.approx(2 / 3)
    assert acc["crossed_threshold"] == 2  # 1: 1.0 -> 4.5 up, 2: 4.2 -> 3.5 down
    assert acc["flagged_reviewed"] == 1 and acc["flagged_label_errors"] == 1
    assert acc["flagged_label_error_rate"] == 1.0
    rows = _relabels(cfg)
    assert [(r[0], r[1], r[2], r[4]) for r in rows] == [
        (1, 4.5, "ana", True),
        (2, 3.5, "ana", True),
        (3, 2.0, "ana", True),
    ]
    assert rows[0][3] == "review c1 (top_disagreement): sky was great"
    # the same file again: nothing new
    assert review.import_job(cfg, f)["status"] == "already_imported"
    assert len(_relabels(cfg)) == 3
    # a later review of snapshot 1 supersedes the earlier label
    g = tmp_path / "again.csv"
    g.write_text(HEADER + f"1,4.0,bo,c1,{V},\n")
    assert review.import_job(cfg, g)["rows"] == 1
    rows = _relabels(cfg)
    assert [(r[0], r[1], r[4]) for r in rows if r[0] == 1] == [(1, 4.5, False), (1, 4.0, True)]
    with db.connect(cfg) as conn:
        (acc_json,) = conn.execute(
            sql.SQL("select accounting from {} order by id limit 1").format(
                _t(cfg, "review_imports")
            )
        ).fetchone()
    assert acc_json["changed"] == 2


GOOD_ROW = "3,2,ana,,,\n"  # first in each bad file: it must not be written either


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (HEADER + GOOD_ROW + "99,3,ana,,,\n", "line 3: snapshot 99 does not exist"),
        (HEADER + GOOD_ROW + "4,3,ana,,,\n", "line 3: snapshot 4 was in no review set"),
        (HEADER + GOOD_ROW + "1,7,ana,,,\n", "line 3: label 7 is outside 0..5"),
        (HEADER + GOOD_ROW + "1,=1+1,ana,,,\n", "line 3: label '=1+1' is not a number"),
        (HEADER + GOOD_ROW + "1,3,,,,\n", "line 3: no reviewer"),
        (
            HEADER + GOOD_ROW + "1,3,ana,,,\n1,2,ana,,,\n",
            "line 4: snapshot 1 again (first on line 3)",
        ),
        ("snapshot_id,label\n1,3\n", "missing column(s) reviewer"),
        ("", "missing column(s) snapshot_id, label, reviewer"),
        (HEADER, "no rows"),
    ],
)
def test_a_bad_csv_is_rejected_whole_naming_the_rows(world, tmp_path, body, needle):
    cfg = world
    f = tmp_path / "bad.csv"
    f.write_text(body)
    with pytest.raises(InputError) as err:
        review.import_job(cfg, f)
    assert needle in str(err.value)
    assert _relabels(cfg) == []


def test_formula_cells_are_neutralised(world, tmp_path):
    cfg = world
    f = tmp_path / "inj.csv"
    f.write_text(HEADER + '1,3,"=HYPERLINK(""http://x"",""y"")",c1,,@SUM(A1)\n')
    out = review.import_job(cfg, f)
    assert out["accounting"]["neutralised_cells"] == 2
    (row,) = _relabels(cfg)
    assert row[2] == '\'=HYPERLINK("http://x","y")'
    assert row[3].endswith(": '@SUM(A1)")


def test_the_review_role_may_write_relabels_and_read_the_app(world):
    cfg = world
    with db.connect(cfg) as conn:
        ask = lambda q, *a: conn.execute(q, a).fetchone()[0]  # noqa: E731
        ml = cfg.database.ml_schema
        for t in ("manual_relabels", "review_cycles", "review_items", "review_imports"):
            assert ask("select has_table_privilege('airatings_review', %s, 'INSERT')", f"{ml}.{t}")
        assert not ask(
            "select has_table_privilege('airatings_review', %s, 'INSERT')",
            f"{ml}.model_training_runs",
        )
        app = cfg.database.app_schema
        assert ask(
            "select has_table_privilege('airatings_review', %s, 'SELECT')",
            f"{app}.webcam_snapshots",
        )
        assert not ask(
            "select has_table_privilege('airatings_review', %s, 'UPDATE')",
            f"{app}.webcam_snapshots",
        )
    assert json.dumps(review.CSV_COLUMNS)


def test_a_snapshot_in_two_versions_sets_needs_the_version(world, tmp_path):
    """Snapshot 2 is also in another version's set of the same cycle: a row without cycle and
    model_version is ambiguous (its accounting would use either item), one naming them is
    not."""
    cfg = world
    other = "rv_v2_2026_01_02"
    with db.connect(cfg) as conn:
        conn.execute(
            sql.SQL(
                "insert into {} (model_version, status, dataset_hash, config_hash) values"
                " (%s, 'cached', %s, %s)"
            ).format(_t(cfg, "model_training_runs")),
            (other, "e" * 64, cfg.config_hash),
        )
        conn.execute(
            sql.SQL(
                "insert into {} (cycle, model_version, data_path, data_sha256, slices_sha256,"
                " items_sha256) values ('c1', %s, 'x', 'x', 'x', 'x')"
            ).format(_t(cfg, "review_cycles")),
            (other,),
        )
        conn.execute(
            sql.SQL(
                "insert into {} (cycle, model_version, snapshot_id, reason, item_rank, ai_rating,"
                " label_value, abs_error) values ('c1', %s, 2, 'top_disagreement', 1, 1.0, 4.2, 3.2)"
            ).format(_t(cfg, "review_items")),
            (other,),
        )
    f = tmp_path / "amb.csv"
    f.write_text(HEADER + "2,3.5,ana,,,\n")
    with pytest.raises(
        InputError,
        match="line 2: snapshot 2 is in the review sets of .* give cycle and model_version",
    ):
        review.import_job(cfg, f)
    g = tmp_path / "named.csv"
    g.write_text(HEADER + f"2,3.5,ana,c1,{other},\n")
    out = review.import_job(cfg, g)
    assert out["rows"] == 1 and out["accounting"]["by_reason"] == {"top_disagreement": 1}
