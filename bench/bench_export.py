"""Benchmark: `airatings export` against raw DuckDB / raw COPY on synthetic snapshot rows.

Starts its own embedded PostgreSQL in a temp dir, fills the app tables with generate_series
(--rows snapshots, ~3 ratings each, ~20% failing a gate), builds dbt once (not timed), then
times, best of --repeat:

- export:  jobs.export.export_dataset (DuckDB read of fct_dataset_splits, Parquet manifests,
           dataset hash, atomic writes, dataset.json, run row + label COPY in one transaction)
           vs raw: DuckDB `COPY (same query) TO 'x.parquet'`            goal <= 1.3x
- manifests only (export minus the label insert) vs the same raw COPY    goal <= 1.3x
- the default export's manifests (Parquet + CSV) vs raw COPY to Parquet + raw COPY to CSV
- labels:  jobs.export._insert_labels (CSV serialisation, rating ids included, + COPY)
           vs raw: COPY of the same pre-serialised rows into the same table  goal <= 1.5x

Usage: .venv/bin/python bench/bench_export.py [--rows 1000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from psycopg import sql  # noqa: E402

from jobs import db, dbt_runner, export, runs  # noqa: E402
from jobs.config import load_config  # noqa: E402

FILL = """
insert into webcams (id, name, region, source)
select i, 'cam ' || i, (array['alps', 'coast', 'city', 'desert'])[1 + i % 4],
       (array['public', 'partner'])[1 + i % 2]
from generate_series(1, 500) as i;

insert into webcam_snapshots (id, webcam_id, firebase_url, phase, captured_at, calculated_rating, rating_count)
select i,
       1 + (i::bigint * 7919) % 500,
       case when i % 50 = 0 then null
            when i % 97 = 0 then 'ftp://cdn.example.com/' || i || '.jpg'
            else 'https://cdn.example.com/snaps/' || i || '.jpg' end,
       case when i % 2 = 0 then 'sunrise' else 'sunset' end,
       timestamptz '2025-01-01 00:00+00' + (i % 365) * interval '1 day' + (i % 24) * interval '1 hour',
       null,
       case when i % 6 = 0 then 1 else 3 end
from generate_series(1, %(rows)s) as i;

insert into webcam_snapshot_ratings (snapshot_id, user_id, rating, created_at)
select s.id, 'u' || k, ((s.id * 31 + k * 17) % 6)::integer, s.captured_at + k * interval '1 hour'
from webcam_snapshots s
cross join lateral generate_series(1, s.rating_count) as k;

update webcam_snapshots s set calculated_rating = a.mean
from (select snapshot_id, avg(rating)::double precision as mean
      from webcam_snapshot_ratings group by snapshot_id) a
where a.snapshot_id = s.id;
"""


def best(times: list[float]) -> float:
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_export_"))
    pgdata = tmp / "pg"
    try:
        url = db.start_embedded(pgdata)
        cfg = load_config(
            REPO / "configs" / "v2_baseline.yaml",
            env={
                "DATABASE_URL": url,
                "AIR_ARTIFACTS_DIR": str(tmp / "artifacts"),
                "AIR_DATA_DIR": str(tmp / "data"),
            },
        )
        db.migrate(cfg)
        t0 = time.perf_counter()
        with db.connect(cfg) as conn:
            conn.execute("set search_path to public")
            conn.execute((REPO / "jobs" / "demo" / "app_schema.sql").read_text())
            conn.execute(FILL.replace("%(rows)s", str(int(args.rows))))
            conn.commit()
            conn.execute("analyze")
        fill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        dbt_runner.build(cfg)
        build_s = time.perf_counter() - t0
        print(
            f"setup: {args.rows:,} snapshots filled in {fill_s:.1f}s; dbt build {build_s:.1f}s (not timed below)"
        )

        raw_times, raw_csv_times, exp_times, man_times, man_csv_times = [], [], [], [], []
        out = tmp / "raw"
        out.mkdir()
        for i in range(args.repeat):
            con = export.duckdb_connect(cfg)
            target = out / f"raw_{i}.parquet"
            t0 = time.perf_counter()
            con.execute(
                f"copy ({export.splits_query(cfg)}) to {export._duck_literal(str(target))} (format parquet)"
            )
            raw_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            con.execute(
                f"copy ({export.splits_query(cfg)}) to {export._duck_literal(str(target.with_suffix('.csv')))} (format csv, header)"
            )
            raw_csv_times.append(time.perf_counter() - t0)
            con.close()

            # a clean slate so that each export does all the work
            shutil.rmtree(cfg.artifacts_dir, ignore_errors=True)
            with db.connect(cfg) as conn:
                # delete, not truncate: the registry's history tables refuse a truncate
                # cascading into them (nothing here is registered, so plain deletes pass)
                conn.execute(
                    sql.SQL("delete from {}").format(runs.table(cfg, "model_training_runs"))
                )
            t0 = time.perf_counter()
            summary = export.export_dataset(cfg, csv=False)
            exp_times.append(time.perf_counter() - t0)

            shutil.rmtree(cfg.artifacts_dir, ignore_errors=True)
            t0 = time.perf_counter()
            table, _, _ = export.read_snapshot(cfg)
            params = export.export_params(cfg)
            digest = export.dataset_hash(table, params)
            export.write_dataset(cfg, table, digest, params, csv=False)
            man_times.append(time.perf_counter() - t0)

            shutil.rmtree(cfg.artifacts_dir, ignore_errors=True)
            t0 = time.perf_counter()
            table, _, _ = export.read_snapshot(cfg)
            params = export.export_params(cfg, csv=True)
            digest = export.dataset_hash(table, params)
            export.write_dataset(cfg, table, digest, params, csv=True)
            man_csv_times.append(time.perf_counter() - t0)

        rows = summary["counts"]["total"]
        lab_times, raw_lab_times = [], []
        for _ in range(args.repeat):
            with db.connect(cfg) as conn:
                run_id = summary["run_id"]
                conn.execute(
                    sql.SQL("delete from {} where training_run_id = %s").format(
                        runs.table(cfg, "model_training_snapshot_labels")
                    ),
                    (run_id,),
                )
                t0 = time.perf_counter()
                export._insert_labels(conn, cfg, run_id, table)
                lab_times.append(time.perf_counter() - t0)
                conn.rollback()
                payload = export._labels_csv(table, run_id)
                conn.execute(
                    sql.SQL("delete from {} where training_run_id = %s").format(
                        runs.table(cfg, "model_training_snapshot_labels")
                    ),
                    (run_id,),
                )
                t0 = time.perf_counter()
                export.copy_labels(conn, cfg, payload)
                raw_lab_times.append(time.perf_counter() - t0)
                conn.rollback()

        raw, exp, man = best(raw_times), best(exp_times), best(man_times)
        raw_csv, man_csv = best(raw_csv_times), best(man_csv_times)
        lab, raw_lab = best(lab_times), best(raw_lab_times)
        print(f"rows exported: {rows:,} of {args.rows:,} snapshots (best of {args.repeat})")
        print(
            f"raw DuckDB COPY (query) TO parquet : {raw:7.3f}s  (median {statistics.median(raw_times):.3f}s)"
        )
        print(
            f"export (manifests+hash+run+labels) : {exp:7.3f}s  ratio {exp / raw:5.2f}x  (goal <= 1.3x)"
        )
        print(
            f"  of which manifests + hash        : {man:7.3f}s  ratio {man / raw:5.2f}x  (goal <= 1.3x)"
        )
        print(
            f"raw DuckDB COPY to parquet + csv   : {raw + raw_csv:7.3f}s  (csv alone {raw_csv:.3f}s)"
        )
        print(
            f"manifests + hash, parquet + csv    : {man_csv:7.3f}s  ratio {man_csv / (raw + raw_csv):5.2f}x"
            "  (the default export)"
        )
        print(f"raw COPY of the label rows         : {raw_lab:7.3f}s  (rating ids included)")
        print(
            f"label insert (serialise + COPY)    : {lab:7.3f}s  ratio {lab / raw_lab:5.2f}x  (goal <= 1.5x)"
        )
        return 0
    finally:
        try:
            db.stop_embedded(pgdata)
        finally:
            if not args.keep:
                shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
