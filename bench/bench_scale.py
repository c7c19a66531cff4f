"""Benchmark: the cache and score jobs cost the same per item at 100k snapshots as at 10k.

    .venv/bin/python bench/bench_scale.py [--small 10000] [--large 100000]
                                          [--export-rows 100000,1000000] [--workdir DIR]

One embedded PostgreSQL (started here, in a temp dir, with ``pg_stat_statements`` preloaded)
and one loopback image server in its own process (``/img/<n>.jpg``: a 64x48 JPEG, distinct
bytes per n). For each size N, a fresh database holds an app world of N snapshots (inserted
with COPY, all captured in the last day), an exported run whose manifests list the same N
URLs (label rows by COPY) and a registered model; then, each as its own OS process, as the
CronJob / Job runs it:

1. ``airatings cache --run <exported run>`` (fetch, validate, training copy, index, shard
   file, merge, active manifests, label provenance),
2. ``airatings score --model <version> --since 2d`` (page queries, index lookups, cached
   originals, decode, onnxruntime, calibration, one transaction per 64 snapshots).

Measured per process: wall time, peak RSS (``os.wait4``'s rusage of that very child, so the
figure is the job's own, not this script's) and the statements the job sent to PostgreSQL:
``sum(calls)`` in ``pg_stat_statements`` for that database (reset before each job; every
top-level statement counts, utility ones such as BEGIN/COMMIT and advisory locks included,
and each row of a pipelined ``executemany`` counts once), plus transactions committed
(``pg_stat_database.xact_commit``). Ratios printed: large/small per-item time (goal <= 1.2),
peak RSS (goal <= 1.3), statements per item (constant).

The model is the tests' registered model (tests/registry_fixtures.py: trained, evaluated,
exported to ONNX and registered by the real jobs), mobilenet_v3_small at a 64-px input, the
same ONNX interface and card as production (uint8 NHWC ``image`` -> ``raw_score``, resize in
the graph). Production's 160-px model costs ~5 ms an image on 2 cores, which would make a
110k-snapshot run take ~10 minutes of inference alone; the scaling question is about the job
around the model, whose per-item cost the small model leaves visible.

Then the export at ``--export-rows`` snapshots by ``bench/bench_export.py --repeat 1`` (its own
database; dbt build not timed), and a linear projection of the export to 10M from the two
largest sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import io
import json
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
AIRATINGS = str(Path(sys.executable).with_name("airatings"))
WEBCAMS = 200


# ---- the image server (its own process) --------------------------------------------------------


def _base_jpeg() -> bytes:
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:48, 0:64]
    arr = np.stack([x * 4 % 256, y * 5 % 256, (x + y) * 2 % 256], axis=-1).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _unique(data: bytes, n: int) -> bytes:
    """A distinct, still valid JPEG: a COM segment after SOI carrying the index."""
    payload = f"scale-{n}".encode()
    return data[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


def _serve(port_q: mp.Queue) -> None:
    import asyncio

    from aiohttp import web

    base = _base_jpeg()

    async def img(request: web.Request) -> web.Response:
        body = _unique(base, int(request.match_info["n"]))
        return web.Response(body=body, content_type="image/jpeg")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/img/{n}.jpg", img)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        port_q.put(runner.addresses[0][1])
        await asyncio.Event().wait()

    asyncio.run(main())


# ---- the database ------------------------------------------------------------------------------


def _start_pg(pgdata: Path) -> str:
    """The embedded server with pg_stat_statements preloaded (a restart after ALTER SYSTEM)."""
    import psycopg

    from jobs import db

    url = db.start_embedded(pgdata)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("alter system set shared_preload_libraries = 'pg_stat_statements'")
        conn.execute("alter system set pg_stat_statements.track = 'top'")
        conn.execute("alter system set pg_stat_statements.max = 10000")
    db.stop_embedded(pgdata)
    url = db.start_embedded(pgdata)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("create extension if not exists pg_stat_statements")
    return url


class Counters:
    """Statements and commits of one database, read from a connection to another one."""

    def __init__(self, admin_url: str, dbname: str) -> None:
        self.admin_url, self.dbname = admin_url, dbname

    def _read(self) -> tuple[int, int]:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute("select pg_stat_clear_snapshot()")
            (calls,) = conn.execute(
                "select coalesce(sum(calls), 0) from pg_stat_statements s"
                " join pg_database d on d.oid = s.dbid where d.datname = %s",
                (self.dbname,),
            ).fetchone()
            (commits,) = conn.execute(
                "select xact_commit from pg_stat_database where datname = %s", (self.dbname,)
            ).fetchone()
        return int(calls), int(commits)

    def reset(self) -> None:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute("select pg_stat_statements_reset()")
        time.sleep(1.2)  # let earlier backends' transaction counts reach the stats
        self._commits0 = self._read()[1]

    def read(self) -> dict[str, int]:
        time.sleep(1.2)  # the job's backends flush their counts as they exit
        calls, commits = self._read()
        return {"statements": calls, "commits": commits - self._commits0, "top": self._top()}

    def _top(self) -> list[dict[str, Any]]:
        """The statements that took the most server time: where a per-page cost would show."""
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            rows = conn.execute(
                "select calls, total_exec_time, left(regexp_replace(query, '\\s+', ' ', 'g'), 90)"
                " from pg_stat_statements s join pg_database d on d.oid = s.dbid"
                " where d.datname = %s order by total_exec_time desc limit 3",
                (self.dbname,),
            ).fetchall()
        return [
            {"calls": c, "total_ms": round(t, 1), "mean_ms": round(t / c, 3), "query": q}
            for c, t, q in rows
        ]


# ---- one size's world --------------------------------------------------------------------------


def _url(port: int, n: int) -> str:
    return f"http://127.0.0.1:{port}/img/{n}.jpg"


def _fill_app(cfg: Any, n: int, port: int) -> None:
    """Webcams and N snapshots (ids 1..N, one a second back from now), by COPY."""
    from psycopg import sql

    from jobs import db

    app = sql.Identifier(cfg.database.app_schema)
    now = dt.datetime.now(dt.UTC)
    with db.connect(cfg) as conn, conn.cursor() as cur:
        with cur.copy(
            sql.SQL("copy {}.webcams (id, name, region, source) from stdin").format(app)
        ) as cp:
            for w in range(1, WEBCAMS + 1):
                cp.write_row((w, f"cam {w}", "alps", "public"))
        with cur.copy(
            sql.SQL(
                "copy {}.webcam_snapshots (id, webcam_id, firebase_url, phase, captured_at,"
                " calculated_rating, rating_count) from stdin"
            ).format(app)
        ) as cp:
            for i in range(1, n + 1):
                at = now - dt.timedelta(seconds=60 + i * 40_000 // n)
                cp.write_row((i, 1 + i % WEBCAMS, _url(port, i), "sunset", at, 2.0 + i % 3, 3))
        conn.execute(sql.SQL("analyze {}.webcam_snapshots").format(app))


def _exported_run(cfg: Any, n: int, port: int) -> str:
    """Manifests for snapshots 1..N (the export contract, sha256s recorded), the run row and
    its label rows by COPY: what ``airatings export`` leaves, without dbt."""
    import pyarrow.parquet as pq
    from cache_fixtures import manifest_table
    from psycopg import sql

    from jobs import db, paths, runs
    from jobs.artifacts import sha256_file

    splits = ["train"] * 8 + ["val", "test"]
    rows = [
        {
            "snapshot_id": i,
            "firebase_url": _url(port, i),
            "split": splits[i % 10],
            "label_value": i % 6,
        }
        for i in range(1, n + 1)
    ]
    dataset_hash = hashlib.sha256(f"scale-{n}-{port}".encode()).hexdigest()
    ddir = paths.of(cfg).dataset(dataset_hash).root
    ddir.mkdir(parents=True, exist_ok=True)
    parts = {"full": rows} | {s: [r for r in rows if r["split"] == s] for s in set(splits)}
    files = {}
    for name, part in parts.items():
        path = ddir / f"manifest_{name}.parquet"
        pq.write_table(manifest_table(part), path)
        files[path.name] = {"rows": len(part), "sha256": sha256_file(path)}
    version = f"scale_export_{n}"
    export = {"dataset_dir": str(ddir), "dataset_hash": dataset_hash, "files": files}
    with db.connect(cfg) as conn:
        (run_id,) = conn.execute(
            sql.SQL(
                "insert into {} (model_version, status, dataset_hash, config_hash, params_json)"
                " values (%s, 'exported', %s, %s, %s) returning id"
            ).format(runs.table(cfg, "model_training_runs")),
            (version, dataset_hash, cfg.config_hash, json.dumps({"export": export})),
        ).fetchone()
        with (
            conn.cursor() as cur,
            cur.copy(
                sql.SQL(
                    "copy {} (training_run_id, snapshot_id, label_source, label_value, split)"
                    " from stdin"
                ).format(runs.table(cfg, "model_training_snapshot_labels"))
            ) as cp,
        ):
            for r in rows:
                cp.write_row(
                    (run_id, r["snapshot_id"], "calculated_rating", float(r["label_value"]),
                     r["split"])
                )  # fmt: skip
    return version


def _env(db_url: str, root: Path, port: int) -> dict[str, str]:
    return {
        "DATABASE_URL": db_url,
        "AIR_ARTIFACTS_DIR": str(root / "artifacts"),
        "AIR_DATA_DIR": str(root / "data"),
        "AIR__CACHE__ALLOWED_PRIVATE_HOSTS": f'["127.0.0.1:{port}"]',
        "AIR__CACHE__PROGRESS_EVERY_S": "3600",
        "AIR__CACHE__FAILURE_RATE_LIMIT": "0.01",
        "AIR_LOG_LEVEL": "WARNING",
    }


def _launch(argv: list[str]) -> None:
    """``--launch OUT CMD...``: run CMD, then write its exit code and rusage to OUT. This small
    process is the job's parent, not the benchmark: Linux carries the pre-exec image's peak
    RSS into the child's ``ru_maxrss``, and the benchmark process holds torch after training
    the model."""
    out, cmd = argv[0], argv[1:]
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    Path(out).write_text(
        json.dumps(
            {
                "exit": os.waitstatus_to_exitcode(status),
                "maxrss_kib": usage.ru_maxrss,
                "cpu_s": usage.ru_utime + usage.ru_stime,
            }
        )
    )


def _job(cmd: list[str], env: dict[str, str], counters: Counters, out_dir: Path) -> dict:
    """Run one job as its own process; its wall time, peak RSS and database statements."""
    counters.reset()
    name = cmd[0]
    usage_file = out_dir / f"{name}.rusage.json"
    with (
        open(out_dir / f"{name}.stdout", "w") as so,
        open(out_dir / f"{name}.stderr", "w") as se,
    ):
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, __file__, "--launch", str(usage_file), AIRATINGS, *cmd, "--json"],
            stdout=so, stderr=se, env={**os.environ, **env}, check=True,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
    usage = json.loads(usage_file.read_text())
    if usage["exit"] != 0:
        err = (out_dir / f"{name}.stderr").read_text()[-4000:]
        raise SystemExit(f"{' '.join(cmd)} exited {usage['exit']}:\n{err}")
    summary = json.loads((out_dir / f"{name}.stdout").read_text().strip().splitlines()[-1])
    return {
        "seconds": round(seconds, 2),
        "job_seconds": summary["seconds"],  # the job's own, without interpreter start-up
        "maxrss_mib": round(usage["maxrss_kib"] / 1024, 1),  # KiB on Linux
        "cpu_s": round(usage["cpu_s"], 1),
        **counters.read(),
        "summary": summary,
    }


def _measure_size(n: int, admin_url: str, port: int, root: Path, base: Any) -> dict:
    import psycopg
    from conftest import with_dbname
    from export_fixtures import create_app_tables
    from registry_fixtures import Registry

    from jobs import db
    from jobs import register as register_job
    from jobs.config import load_config

    name = f"scale_{n}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    url = with_dbname(admin_url, name)
    env = _env(url, root, port)
    cfg = load_config(REPO / "configs" / "v2_baseline.yaml", env=env)
    t0 = time.perf_counter()
    db.migrate(cfg)
    create_app_tables(cfg)
    db.migrate(cfg)  # the app's tables exist now: the scorer's key, function and grants
    _fill_app(cfg, n, port)
    exported = _exported_run(cfg, n, port)
    model = f"scale_model_{n}"
    Registry(cfg, *base).clone(model)
    assert register_job.run(cfg, model)["status"] == "registered"
    setup_s = time.perf_counter() - t0
    counters = Counters(admin_url, name)
    out_dir = root / "logs"
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = _job(["cache", "--run", exported], env, counters, out_dir)
    assert cache["summary"]["status"] == "cached", cache["summary"]
    assert cache["summary"]["active_rows"] == n, cache["summary"]
    score = _job(["score", "--model", model, "--since", "2d"], env, counters, out_dir)
    assert score["summary"]["scored"] == n, score["summary"]
    assert score["summary"]["images"].get("cached") == n, score["summary"]["images"]
    return {"n": n, "setup_s": round(setup_s, 1), "cache": cache, "score": score}


# ---- the export (bench_export.py) --------------------------------------------------------------


def _export_times(sizes: list[int]) -> dict[int, dict[str, float]]:
    out = {}
    for rows in sizes:
        proc = subprocess.run(
            [sys.executable, str(REPO / "bench" / "bench_export.py"), "--rows", str(rows),
             "--repeat", "1"],
            capture_output=True, text=True, timeout=3600,
        )  # fmt: skip
        if proc.returncode != 0:
            raise SystemExit(f"bench_export.py --rows {rows} failed:\n{proc.stderr[-4000:]}")
        got = {}
        for key, pattern in {
            "export_s": r"export \(manifests\+hash\+run\+labels\) :\s+([\d.]+)s",
            "manifests_s": r"of which manifests \+ hash\s+:\s+([\d.]+)s",
            "raw_copy_s": r"raw DuckDB COPY \(query\) TO parquet :\s+([\d.]+)s",
            "fill_s": r"filled in ([\d.]+)s",
            "dbt_build_s": r"dbt build ([\d.]+)s",
        }.items():
            m = re.search(pattern, proc.stdout)
            got[key] = float(m.group(1)) if m else float("nan")
        m = re.search(r"rows exported: ([\d,]+)", proc.stdout)
        got["rows_exported"] = int(m.group(1).replace(",", "")) if m else 0
        out[rows] = got
        print(f"export at {rows:,} snapshots: {json.dumps(got)}", flush=True)
    return out


# ---- main --------------------------------------------------------------------------------------


def _default_workdir() -> str | None:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 6 * 2**30:
        return str(shm)
    return None


def _per_item(s: dict, job: str, key: str = "seconds") -> float:
    return s[job][key] / s["n"]


def main() -> None:
    if sys.argv[1:2] == ["--launch"]:
        _launch(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--large", type=int, default=100_000)
    ap.add_argument("--export-rows", default="100000,1000000", help="comma-separated; '' skips")
    ap.add_argument("--workdir", help="artifacts and database (default: /dev/shm if it has room)")
    ap.add_argument("--json", help="also write every figure to this JSON file")
    args = ap.parse_args()

    from registry_fixtures import exported_world

    from jobs import db, logs

    logs.configure(level="WARNING")
    load = os.getloadavg()
    started = dt.datetime.now(dt.UTC)
    q: mp.Queue = mp.Queue()
    server = mp.Process(target=_serve, args=(q,), daemon=True)
    server.start()
    port = q.get(timeout=120)
    workdir = args.workdir or _default_workdir()
    result: dict[str, Any] = {"started": started.isoformat(), "loadavg_start": load}
    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=workdir) as tmp:
        pgdata = Path(tmp) / "pg"
        admin_url = _start_pg(pgdata)
        try:
            with contextlib.ExitStack() as stack:
                t0 = time.perf_counter()
                base = stack.enter_context(exported_world(admin_url, Path(tmp) / "model"))
                print(f"model trained, evaluated, exported in {time.perf_counter() - t0:.0f}s "
                      f"(not timed below); load average {load}", flush=True)  # fmt: skip
                sizes = {}
                for label, n in (("small", args.small), ("large", args.large)):
                    sizes[label] = _measure_size(n, admin_url, port, Path(tmp) / f"n{n}", base)
                    s = sizes[label]
                    print(
                        f"{n:>7} snapshots: cache {s['cache']['seconds']}s "
                        f"{s['cache']['maxrss_mib']} MiB {s['cache']['statements']} statements;"
                        f" score {s['score']['seconds']}s {s['score']['maxrss_mib']} MiB "
                        f"{s['score']['statements']} statements; load {os.getloadavg()}",
                        flush=True,
                    )
        finally:
            db.stop_embedded(pgdata)
            server.terminate()
    result["sizes"] = sizes
    result["loadavg_after_jobs"] = os.getloadavg()
    export_rows = [int(x) for x in args.export_rows.split(",") if x.strip()]
    if export_rows:
        result["export"] = _export_times(export_rows)
    result["loadavg_end"] = os.getloadavg()

    small, large = sizes["small"], sizes["large"]
    print(f"\nbench_scale: {small['n']:,} vs {large['n']:,} snapshots, 64x48 JPEGs on loopback, "
          f"{os.cpu_count()} CPUs, files under {workdir or 'TMPDIR'}")  # fmt: skip
    print(f"load average: start {load}, end {result['loadavg_end']}")
    ratios = {}
    for job in ("cache", "score"):
        a, b = small[job], large[job]
        per_a, per_b = _per_item(small, job), _per_item(large, job)
        st_a, st_b = a["statements"] / small["n"], b["statements"] / large["n"]
        tx_a, tx_b = a["commits"] / small["n"], b["commits"] / large["n"]
        own_a, own_b = _per_item(small, job, "job_seconds"), _per_item(large, job, "job_seconds")
        ratios[job] = {
            "time_per_item": round(per_b / per_a, 3),
            "job_time_per_item": round(own_b / own_a, 3),
            "peak_rss": round(b["maxrss_mib"] / a["maxrss_mib"], 3),
            "statements_per_item": round(st_b / st_a, 3),
        }
        print(f"{job}:")
        print(f"  per item      {per_a * 1e3:7.3f} ms -> {per_b * 1e3:7.3f} ms"
              f"   ratio {per_b / per_a:5.2f}x (goal <= 1.2; process wall time)")  # fmt: skip
        print(f"  per item, job {own_a * 1e3:7.3f} ms -> {own_b * 1e3:7.3f} ms"
              f"   ratio {own_b / own_a:5.2f}x (the job's own seconds: no interpreter"
              " start-up)")  # fmt: skip
        print(f"  peak RSS      {a['maxrss_mib']:7.1f} MiB -> {b['maxrss_mib']:7.1f} MiB"
              f" ratio {b['maxrss_mib'] / a['maxrss_mib']:5.2f}x (goal <= 1.3)")  # fmt: skip
        print(f"  statements    {st_a:7.3f} -> {st_b:7.3f} per item"
              f"   ratio {st_b / st_a:5.2f}x (constant)")  # fmt: skip
        print(f"  commits       {tx_a:7.4f} -> {tx_b:7.4f} per item")
        print(f"  CPU           {a['cpu_s']} s -> {b['cpu_s']} s")
        for label, size in (("small", small), ("large", large)):
            for t in size[job]["top"][:2]:
                print(f"  top statement ({label}): {t['calls']} calls, {t['mean_ms']} ms each,"
                      f" {t['total_ms'] / 1e3:.1f} s: {t['query']}")  # fmt: skip
    result["ratios"] = ratios
    if export_rows:
        ex = result["export"]
        top = sorted(ex)[-2:]
        for rows in sorted(ex):
            print(f"export at {rows:>9,}: {ex[rows]['export_s']:7.2f} s"
                  f" (manifests + hash {ex[rows]['manifests_s']:.2f} s)")  # fmt: skip
        if len(top) == 2:
            (r1, r2), (t1, t2) = top, (ex[top[0]]["export_s"], ex[top[1]]["export_s"])
            slope = (t2 - t1) / (r2 - r1)
            projected = t2 + slope * (10_000_000 - r2)
            result["export_10m_projected_s"] = round(projected, 1)
            print(f"export at 10,000,000 (linear from {r1:,} and {r2:,}): {projected:7.1f} s"
                  f" ({slope * 1e6:.2f} us per added snapshot)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
