"""A run ready to register, made once per test module by the real jobs, then cloned per test.

``exported_world`` trains a tiny world (tests/train_fixtures.py; 14 epochs, so that the model
beats the constant baseline the promotion gate checks), evaluates it (``jobs.evaluate.run``, a
small bootstrap) and exports it (``jobs.onnx_export.run``: the real graph, parity gate and
calibration); ``shared_exported_world`` makes it once per session. ``Registry.clone(version)`` puts a copy of that run, files
and record, at status ``onnx_exported`` into a fresh database and artifact store of its own,
so each test starts from nothing registered and no production alias.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export_fixtures import make_config, scratch_database
from psycopg import sql
from train_fixtures import FAST, make_world, world_rows, write_images

from jobs import db, paths, runs
from jobs.config import Config

SETTINGS = {
    **FAST,
    "train__epochs": 14,  # 8 beat the constant by 0.002 MAE (luck); 14: by 0.35, CI [-0.45, -0.24]
    "evaluate__bootstrap_samples": 100,
    "evaluate__min_test_rows": 5,
    "evaluate__min_slice_size": 5,
}
RUNS = "model_training_runs"


@contextlib.contextmanager
def exported_world(pg_server: str, tmp: Path) -> Iterator[tuple[Config, dict[str, Any]]]:
    """(cfg, world) of a run at ``onnx_exported``, made by train, evaluate and export-onnx."""
    import jobs.evaluate
    import jobs.onnx_export
    import jobs.train

    with scratch_database(pg_server) as url:
        cfg = make_config(url, tmp, **SETTINGS)
        db.migrate(cfg)
        rows = world_rows(160, seed=5, good_threshold=cfg.dataset.good_threshold)
        write_images(cfg, rows, seed=5)
        world = make_world(cfg, rows=rows)
        jobs.train.run(cfg)
        jobs.evaluate.run(cfg)
        out = jobs.onnx_export.run(cfg)
        assert out["status"] == "onnx_exported", out
        yield cfg, world


_shared: dict[str, tuple[Config, dict[str, Any]]] = {}


def shared_exported_world(
    request: Any, pg_server: str, tmp_path_factory: Any
) -> tuple[Config, dict[str, Any]]:
    """:func:`exported_world`, made once per session for every module that asks (training
    is the slow part); torn down with the session, before the server it lives on. Tests only
    clone from it, never change it."""
    if pg_server not in _shared:
        stack = contextlib.ExitStack()
        _shared[pg_server] = stack.enter_context(
            exported_world(pg_server, tmp_path_factory.mktemp("registry_base"))
        )

        def close() -> None:
            _shared.pop(pg_server, None)
            stack.close()

        request.session.addfinalizer(close)
    return _shared[pg_server]


def row_of(cfg: Config, version: str) -> dict[str, Any] | None:
    with db.connect(cfg) as conn:
        cur = conn.execute(
            sql.SQL(
                "select id, status, artifact_sha256, artifact_path, params_json from {}"
                " where model_version = %s"
            ).format(runs.table(cfg, RUNS)),
            (version,),
        )
        row = cur.fetchone()
    if row is None:
        return None
    return dict(
        zip(("id", "status", "artifact_sha256", "artifact_path", "params"), row, strict=True)
    )


def set_param(cfg: Config, run_id: int, path: list[str], value: Any) -> None:
    """``params_json #> path = value`` (what a step's record would say)."""
    with db.connect(cfg) as conn:
        conn.execute(
            sql.SQL(
                "update {} set params_json = jsonb_set(params_json, %s::text[], %s::jsonb)"
                " where id = %s"
            ).format(runs.table(cfg, RUNS)),
            (path, json.dumps(value), run_id),
        )


@dataclass
class Registry:
    """A fresh database + artifact store per test, holding clones of the exported run."""

    cfg: Config
    base_cfg: Config
    base_world: dict[str, Any]

    def clone(self, version: str, *, status: str = "onnx_exported", labels: bool = False) -> int:
        """A copy of the exported run under ``version`` (files and record); returns its id.
        ``labels``: also three provenance rows (two used, one excluded) the cache recorded."""
        base = self.base_world["model_version"]
        src = paths.of(self.base_cfg).run(base).root
        dst = paths.of(self.cfg).run(version).root
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".tmp-*"))
        images = paths.of(self.cfg).artifacts_dir / "images"
        if not images.exists():
            shutil.copytree(paths.of(self.base_cfg).artifacts_dir / "images", images)
        with db.connect(self.base_cfg) as conn:
            status_, dataset_hash, config_hash, params, trained_at = conn.execute(
                sql.SQL(
                    "select status, dataset_hash, config_hash, params_json, trained_at from {}"
                    " where id = %s"
                ).format(runs.table(self.base_cfg, RUNS)),
                (self.base_world["run_id"],),
            ).fetchone()
        assert status_ == "onnx_exported"
        if labels:
            params["cache"]["labels"] = {"used": 2, "excluded": 1, "offered": 3}
        with db.connect(self.cfg) as conn:
            (run_id,) = conn.execute(
                sql.SQL(
                    "insert into {} (model_version, status, dataset_hash, config_hash,"
                    " params_json, trained_at) values (%s, %s, %s, %s, %s, %s) returning id"
                ).format(runs.table(self.cfg, RUNS)),
                (version, status, dataset_hash, config_hash, json.dumps(params), trained_at),
            ).fetchone()
            if labels:
                conn.execute(
                    sql.SQL(
                        "insert into {} (training_run_id, snapshot_id, label_source, label_value,"
                        " split, used_in_training, exclusion_reason) values"
                        " (%s, 1, 'calculated_rating', 4.5, 'train', true, null),"
                        " (%s, 2, 'calculated_rating', 1.0, 'test', true, null),"
                        " (%s, 3, 'manual_review', 3.0, 'val', false, 'download_failed')"
                    ).format(runs.table(self.cfg, "model_training_snapshot_labels")),
                    (run_id, run_id, run_id),
                )
        return run_id


@contextlib.contextmanager
def registry_for_test(
    pg_server: str, tmp: Path, base: tuple[Config, dict[str, Any]], **overrides: object
) -> Iterator[Registry]:
    with scratch_database(pg_server) as url:
        cfg = make_config(url, tmp, **{**SETTINGS, **overrides})
        db.migrate(cfg)
        yield Registry(cfg, base[0], base[1])
