"""`airatings demo seed`: create the app's tables (if absent) and fill them with the synthetic
demo world (see jobs/demo/world.py for what the world is and what drives quality).

Re-seeding replaces the world: the app tables are truncated (identities restarted) and
refilled with COPY in one transaction; image files are written only where missing or
different (atomically), and files that are no longer part of the world are removed, so a
dead URL stays dead. Same seed and config -> identical rows (``created_at`` included, taken
from the simulated clock) and identical image bytes.

It refuses to touch app tables that hold rows it did not write (a real app database).
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.errors import InputError

if TYPE_CHECKING:
    import psycopg

    from jobs.config import Config

APP_TABLES = ("webcams", "webcam_snapshots", "webcam_snapshot_ratings", "snapshot_ai_inferences")
# Set as the comment of <app_schema>.webcams: tables with this comment may be replaced.
MARKER = "airatings demo world: replaced by `airatings demo seed`"
_BATCH = 24


def app_schema_sql() -> str:
    return (resources.files("jobs") / "demo" / "app_schema.sql").read_text(encoding="utf-8")


def seed(cfg: Config, snapshots: int | None = None, seed: int | None = None) -> dict[str, Any]:
    """Create the app tables if absent and replace their contents with the demo world."""
    from jobs import db, logs, paths
    from jobs.artifacts import sweep_temp
    from jobs.demo import world

    log = logs.get_logger()
    started = time.monotonic()
    n = cfg.demo.snapshots if snapshots is None else snapshots
    world_seed = cfg.demo.seed if seed is None else seed
    if n < 10:
        raise InputError(f"--snapshots must be at least 10, got {n}")
    if world_seed < 0:
        raise InputError(f"--seed must be >= 0, got {world_seed}")
    schema = cfg.database.app_schema
    out_dir = paths.of(cfg).demo_images
    logs.bind(seed=world_seed, app_schema=schema)

    with db.job_lock(cfg, "demo-seed", schema) as held:
        if not held:
            log.info("demo_seed_skipped", reason="another demo seed holds the lock")
            return {
                "status": "skipped",
                "reason": "another `demo seed` is running on this database",
            }
        with db.connect(cfg) as conn:
            _refuse_foreign_data(conn, schema)  # before any write
        swept = sweep_temp(out_dir) if out_dir.exists() else 0
        fingerprint = _world_fingerprint(cfg, n, world_seed, out_dir)
        with db.connect(cfg) as conn:
            # Before any file changes: the cache's URL index must not serve the old world's
            # image for a URL whose file is about to be rewritten or removed.
            unindexed = _forget_cached_urls(conn, cfg, out_dir, fingerprint)

        w = world.simulate(cfg.demo, snapshots=n, seed=world_seed, images_dir=out_dir)
        log.info("world_simulated", snapshots=n, webcams=len(w.webcams), ratings=len(w.ratings))

        results = _render_all(w.images, cfg.demo.workers)
        written = sum(1 for _, _, changed in results if changed)
        total_bytes = sum(size for _, size, _ in results)
        log.info("images_rendered", images=len(results), written=written, bytes=total_bytes)

        with db.connect(cfg) as conn:
            _load(conn, schema, w, fingerprint)
        log.info("app_tables_loaded", webcams=len(w.webcams), snapshots=n, ratings=len(w.ratings))

        stale = _remove_stale(out_dir, {Path(p["path"]) for p in w.images})
        _write_truth(paths.of(cfg).demo_truth, w.truth)

    q = w.truth["true_quality"]
    summary = {
        "status": "seeded",
        "seed": world_seed,
        "app_schema": schema,
        "webcams": len(w.webcams),
        "snapshots": n,
        "ratings": len(w.ratings),
        "raters": cfg.demo.raters,
        "rated_snapshots": sum(1 for row in w.snapshots if row[6] > 0),
        "images": len(results),
        "images_written": written,
        "images_unchanged": len(results) - written,
        "stale_files_removed": stale + swept,
        "cache_index_rows_forgotten": unindexed,
        "bytes": total_bytes,
        "image_size": f"{cfg.demo.image_width}x{cfg.demo.image_height}",
        "images_dir": str(out_dir),
        "truth_path": str(paths.of(cfg).demo_truth),
        "regions": w.counts["regions"],
        "sources": w.counts["sources"],
        "phases": w.counts["phases"],
        "rating_counts": w.counts["rating_counts"],
        "faults": w.faults,
        "true_quality": {
            "mean": round(float(q.mean()), 3),
            "share_ge_4": round(float((q >= 4).mean()), 3),
        },
        "seconds": round(time.monotonic() - started, 3),
    }
    log.info(
        "demo_seeded",
        **{k: v for k, v in summary.items() if not isinstance(v, dict)},
        faults=w.faults,
    )
    return summary


# ---- images --------------------------------------------------------------------------------


def _render_all(images: list[dict[str, Any]], workers: int) -> list[tuple[int, int, bool]]:
    """Render and write every image; a pool of ``workers`` spawned processes when it pays."""
    from jobs.demo.world import write_images

    batches = [images[i : i + _BATCH] for i in range(0, len(images), _BATCH)]
    if workers <= 1 or len(batches) <= 2:
        return [r for b in batches for r in write_images(b)]

    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: no inherited database connections or threads in the workers.
    ctx = multiprocessing.get_context("spawn")
    out: list[tuple[int, int, bool]] = []
    with ProcessPoolExecutor(max_workers=min(workers, len(batches)), mp_context=ctx) as pool:
        try:
            for res in pool.map(write_images, batches):
                out.extend(res)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return out


def _remove_stale(directory: Path, keep: set[Path]) -> int:
    """Delete files under the images dir that are not part of this world (dead URLs stay
    dead, the missing webcam's images stay missing), then empty folders."""
    if not directory.exists():
        return 0
    removed = 0
    for path in sorted(directory.rglob("*"), reverse=True):
        if path.is_file() or path.is_symlink():
            if path not in keep:
                path.unlink()
                removed += 1
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return removed


def _write_truth(path: Path, truth: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.artifacts import atomic_path

    table = pa.table({k: pa.array(list(v) if v.dtype == object else v) for k, v in truth.items()})
    with atomic_path(path, check=lambda p: pq.read_metadata(p)) as tmp:
        pq.write_table(table, tmp)


# ---- database ------------------------------------------------------------------------------


def _regclass(conn: psycopg.Connection, schema: str, table: str) -> str | None:
    from psycopg import sql

    qualified = sql.Identifier(schema, table).as_string(conn)
    return conn.execute("select to_regclass(%s)::text", (qualified,)).fetchone()[0]


def _refuse_foreign_data(conn: psycopg.Connection, schema: str) -> None:
    """InputError if the app tables hold rows that an earlier demo seed did not write."""
    from psycopg import sql

    if _regclass(conn, schema, "webcams") is None:
        return
    comment = conn.execute(
        "select obj_description(to_regclass(%s), 'pg_class')",
        (sql.Identifier(schema, "webcams").as_string(conn),),
    ).fetchone()[0]
    if comment == MARKER:
        return
    for table in APP_TABLES:
        if _regclass(conn, schema, table) is None:
            continue
        has_rows = conn.execute(
            sql.SQL("select exists (select 1 from {})").format(sql.Identifier(schema, table))
        ).fetchone()[0]
        if has_rows:
            raise InputError(
                f"{schema}.{table} already holds rows that `demo seed` did not write; refusing to "
                f"replace them. Seed into an empty database (DATABASE_URL) or another "
                f"database.app_schema (AIR__DATABASE__APP_SCHEMA)."
            )


def _world_fingerprint(cfg: Config, n: int, seed: int, out_dir: Path) -> str:
    """What decides every row and image byte of the world (rendering workers do not)."""
    import hashlib
    import json

    demo = cfg.demo.model_dump(mode="json", exclude={"workers", "snapshots", "seed"})
    blob = json.dumps([n, seed, str(out_dir), demo], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _world_comment(fingerprint: str) -> str:
    return f"airatings demo world {fingerprint}"


def _forget_cached_urls(
    conn: psycopg.Connection, cfg: Config, out_dir: Path, fingerprint: str
) -> int:
    """Delete ``image_cache`` rows for URLs under the demo images dir, and the scorer's
    ``score_failures``, unless the database already holds this very world. The cache treats a
    URL's content as immutable; a re-seed with another seed or image size rewrites files in
    place (and removes some), and its snapshot ids mean other snapshots."""
    from psycopg import sql

    schema = cfg.database.app_schema
    if _regclass(conn, schema, "webcam_snapshots") is not None:
        current = conn.execute(
            "select obj_description(to_regclass(%s), 'pg_class')",
            (sql.Identifier(schema, "webcam_snapshots").as_string(conn),),
        ).fetchone()[0]
        if current == _world_comment(fingerprint):
            return 0
    if _regclass(conn, cfg.database.ml_schema, "score_failures") is not None:
        # the scorer's failures name the replaced world's snapshot ids: a permanent one would
        # keep a new snapshot with that id from ever being scored
        conn.execute(
            sql.SQL("delete from {}").format(
                sql.Identifier(cfg.database.ml_schema, "score_failures")
            )
        )
    if _regclass(conn, cfg.database.ml_schema, "image_cache") is None:
        return 0
    cur = conn.execute(
        sql.SQL("delete from {} where starts_with(url, %s)").format(
            sql.Identifier(cfg.database.ml_schema, "image_cache")
        ),
        (out_dir.as_uri() + "/",),
    )
    return cur.rowcount


def _load(conn: psycopg.Connection, schema: str, w: Any, fingerprint: str) -> None:
    """One transaction: DDL (if absent), truncate, COPY the world in, move the sequences."""
    from psycopg import sql

    from jobs.demo.world import RATING_COLUMNS, SNAPSHOT_COLUMNS, WEBCAM_COLUMNS

    with conn.transaction():
        conn.execute(sql.SQL("create schema if not exists {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("set local search_path to {}").format(sql.Identifier(schema)))
        conn.execute(app_schema_sql())
        _refuse_foreign_data(conn, schema)  # again, under this transaction
        conn.execute(
            sql.SQL("truncate {} restart identity").format(
                sql.SQL(", ").join(sql.Identifier(schema, t) for t in APP_TABLES)
            )
        )
        with conn.cursor() as cur:
            for table, cols, rows in (
                ("webcams", WEBCAM_COLUMNS, w.webcams),
                ("webcam_snapshots", SNAPSHOT_COLUMNS, w.snapshots),
                ("webcam_snapshot_ratings", RATING_COLUMNS, w.ratings),
            ):
                stmt = sql.SQL("copy {} ({}) from stdin").format(
                    sql.Identifier(schema, table), sql.SQL(", ").join(map(sql.Identifier, cols))
                )
                with cur.copy(stmt) as copy:
                    for row in rows:
                        copy.write_row(row)
                # Explicit ids: move the identity past them so the app's inserts keep working.
                conn.execute(
                    "select setval(pg_get_serial_sequence(%s, 'id'), %s, %s)",
                    (sql.Identifier(schema, table).as_string(conn), max(len(rows), 1), bool(rows)),
                )
        conn.execute(
            sql.SQL("comment on table {} is {}").format(
                sql.Identifier(schema, "webcams"), sql.Literal(MARKER)
            )
        )
        conn.execute(
            sql.SQL("comment on table {} is {}").format(
                sql.Identifier(schema, "webcam_snapshots"), sql.Literal(_world_comment(fingerprint))
            )
        )
        conn.execute(sql.SQL("analyze {}").format(sql.Identifier(schema, "webcam_snapshots")))


__all__ = ["APP_TABLES", "MARKER", "seed"]
