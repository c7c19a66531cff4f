"""Benchmark: the cache's peak memory does not grow with the number of URLs (docs/faults.md 33).

    .venv/bin/python bench/bench_cache_memory.py [--small 20000] [--large 200000] [--full]

Starts a loopback aiohttp server in its own process (a tiny valid JPEG per URL, distinct
bytes each: a COM segment carries the index) and an embedded PostgreSQL in a temp dir, then
runs each size in a fresh Python process and reads that process's peak resident size
(``getrusage(RUSAGE_SELF).ru_maxrss``).

What runs in the measured process (default): ``jobs.cache.cache_urls`` with the real Fetcher
(URL policy, limits, retries, bodies streamed to disk and hashed), the real per-image work
(full validation, the training copy, the content-addressed rename) and a real ``ImageIndex``
on its own database (batched lookups, upserts), then the shard file written from the results
(``UrlResults.write_parquet``): everything ``airatings cache --shard`` does
but reading the manifests and the run row. ``--full`` measures the whole unsharded job
instead (``jobs.cache.run``: manifests in, merge, failures and active manifests out), after
writing the exported run in the parent.

Prints each size's peak RSS, the growth per added URL and the ratio large/small (goal <= 1.3).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def _tiny_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 120, 40)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _unique(data: bytes, n: int) -> bytes:
    """A distinct, still valid JPEG: a COM segment after SOI carrying the index."""
    payload = f"bench-{n}".encode()
    seg = b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload
    return data[:2] + seg + data[2:]


def _serve(port_q: mp.Queue) -> None:
    from aiohttp import web

    base = _tiny_jpeg()

    async def img(request: web.Request) -> web.Response:
        return web.Response(
            body=_unique(base, int(request.match_info["n"])), content_type="image/jpeg"
        )

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


def _env(db_url: str, root: Path, port: int) -> dict[str, str]:
    return {
        "DATABASE_URL": db_url,
        "AIR_ARTIFACTS_DIR": str(root / "artifacts"),
        "AIR_DATA_DIR": str(root / "data"),
        "AIR__CACHE__ALLOWED_PRIVATE_HOSTS": f'["127.0.0.1:{port}"]',
        "AIR__CACHE__PROGRESS_EVERY_S": "3600",
        "AIR__CACHE__FAILURE_RATE_LIMIT": "0.01",
    }


def _urls(port: int, n: int) -> list[str]:
    """Sorted, as the job passes them (``cache._distinct_urls``)."""
    return sorted(f"http://127.0.0.1:{port}/img/{i}.jpg" for i in range(n))


def _child(args: argparse.Namespace) -> None:
    """The measured process: one size, then its peak RSS as JSON on stdout."""
    from jobs import cache, db, logs
    from jobs.config import load_config

    logs.configure(json_logs=True, level="WARNING")
    env = json.loads(os.environ["BENCH_ENV"])
    cfg = load_config(REPO / "configs" / "v2_baseline.yaml", env=env)
    started = time.perf_counter()
    if args.full:
        summary = cache.run(cfg, run_ref=args.version, env={})
        out = {"failed_rows": summary["failed_rows"], "requests": summary["fetch"]["requests"]}
    else:
        urls = _urls(args.port, args.child)
        with db.connect(cfg, autocommit=True) as conn:
            results, stats = asyncio.run(
                cache.cache_urls(cfg, urls, index=cache.ImageIndex(cfg, conn))
            )
        results.write_parquet(cfg.artifacts_dir / "shard.parquet")
        out = {"failed_urls": sum(results.failure_counts().values()), **stats}
    out["seconds"] = round(time.perf_counter() - started, 1)
    out["maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(out))


def _measure(n: int, db_url: str, port: int, root: Path, full: bool) -> dict:
    from jobs import db
    from jobs.config import load_config

    env = _env(db_url, root, port)
    cfg = load_config(REPO / "configs" / "v2_baseline.yaml", env=env)
    db.migrate(cfg)
    cmd = [sys.executable, __file__, "--child", str(n), "--port", str(port)]
    if full:
        from cache_fixtures import make_exported_run

        run = make_exported_run(cfg, _urls(port, n), version=f"bench_mem_{n}")
        cmd += ["--full", "--version", run.model_version]
    proc = subprocess.run(
        cmd,
        env={**os.environ, "BENCH_ENV": json.dumps(env)},
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if proc.returncode != 0:
        raise SystemExit(f"size {n} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _default_workdir() -> str | None:
    """tmpfs when it has room: 200k URLs leave ~440k small files, which a disk-backed temp dir
    takes minutes to create and remove. Files in tmpfs are not the process's resident memory,
    so the measurement is the same."""
    import shutil

    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 6 * 2**30:
        return str(shm)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=20_000)
    ap.add_argument("--large", type=int, default=200_000)
    ap.add_argument("--full", action="store_true", help="measure the whole job (jobs.cache.run)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--workdir", help="where the artifacts go (default: /dev/shm if it has room)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--version", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        _child(args)
        return

    import psycopg
    from conftest import with_dbname

    from jobs import db

    q: mp.Queue = mp.Queue()
    server = mp.Process(target=_serve, args=(q,), daemon=True)
    server.start()
    port = q.get(timeout=120)
    sizes = {}
    workdir = args.workdir or _default_workdir()
    with tempfile.TemporaryDirectory(prefix="bench-cache-mem-", dir=workdir) as tmp:
        pgdata = Path(tmp) / "pg"
        url = db.start_embedded(pgdata)
        try:
            for label, n in (("small", args.small), ("large", args.large)):
                name = f"bench_mem_{n}"
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute(f'create database "{name}"')  # a fresh, empty index each
                sizes[label] = _measure(
                    n, with_dbname(url, name), port, Path(tmp) / name, args.full
                )
                sizes[label]["urls"] = n
        finally:
            db.stop_embedded(pgdata)
            server.terminate()
    small, large = sizes["small"], sizes["large"]
    out = {
        "measured": "jobs.cache.run (whole job)" if args.full else "jobs.cache.cache_urls + shard",
        "small": small,
        "large": large,
        "bytes_per_added_url": round(
            (large["maxrss_bytes"] - small["maxrss_bytes"]) / (large["urls"] - small["urls"]), 1
        ),
        "ratio": round(large["maxrss_bytes"] / small["maxrss_bytes"], 3),
    }
    if args.json:
        print(json.dumps(out))
        return
    print(f"measured: {out['measured']}, cpus={os.cpu_count()}, files under {workdir or 'TMPDIR'}")
    for label in ("small", "large"):
        s = out[label]
        print(
            f"{label:5} {s['urls']:>8} URLs: peak RSS {s['maxrss_bytes'] / 2**20:7.1f} MiB"
            f"  {s['seconds']:7.1f} s  failed={s.get('failed_urls', s.get('failed_rows'))}"
        )
    print(f"growth per added URL: {out['bytes_per_added_url']} bytes")
    print(f"ratio large/small   : {out['ratio']:.2f}x  (goal <= 1.3)")


if __name__ == "__main__":
    main()
