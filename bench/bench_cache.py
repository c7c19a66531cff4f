"""Benchmark: the cache job against a bare aiohttp fetch loop, same concurrency, same run.

    .venv/bin/python bench/bench_cache.py [--files 2000] [--concurrency 64] [--latency-ms 50]

Starts a loopback HTTP server in its own process (~200 KB JPEGs, distinct bytes per URL, a
fixed added latency) and an embedded PostgreSQL in a temp dir, then measures:

1. a bare loop: one aiohttp session, the same concurrency, bodies read and dropped;
2. the real job path (`jobs.cache.run`): policy, retries, streaming to disk + sha256, full
   validation (draft-mode decode), the 256 px training copy, the index, failures, manifests;
3. the resume: a second run over the same URLs (zero requests).

Prints files/s and the ratio job/bare (goal >= 0.8), plus the resume's rows/s. Also the CPU
limit of the per-image work alone (same bodies, same threads, no network) and the job's ratio
to the lower of the two limits: on a small machine the decode, not the network, binds.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def _base_jpegs(count: int, target_kb: int) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(7)
    out = []
    for i in range(count):
        h, w = 720, 1280
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack(
            [(x // 3 + i * 17) % 256, (y // 2 + i * 29) % 256, ((x + y) // 4) % 256], -1
        )
        noise = rng.integers(0, 24, size=(h, w, 3))
        arr = np.clip(base + noise, 0, 255).astype("uint8")
        img = Image.fromarray(arr, "RGB")
        lo, hi = 30, 95
        best = b""
        while lo <= hi:  # the quality whose size is closest below target
            q = (lo + hi) // 2
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=q)
            if buf.tell() <= target_kb * 1024:
                best, lo = buf.getvalue(), q + 1
            else:
                hi = q - 1
        out.append(best or buf.getvalue())
    return out


def _unique(data: bytes, n: int) -> bytes:
    """A distinct, still valid JPEG: a COM segment after SOI carrying the index."""
    payload = f"bench-{n}".encode()
    seg = b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload
    return data[:2] + seg + data[2:]


def _serve(port_q: mp.Queue, latency_s: float, target_kb: int) -> None:
    from aiohttp import web

    bases = _base_jpegs(16, target_kb)

    async def img(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        await asyncio.sleep(latency_s)
        return web.Response(body=_unique(bases[n % len(bases)], n), content_type="image/jpeg")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/img/{n}.jpg", img)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        port_q.put((runner.addresses[0][1], sum(map(len, bases)) / len(bases)))
        await asyncio.Event().wait()

    asyncio.run(main())


async def _bare(urls: list[str], concurrency: int) -> tuple[float, int]:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    total = 0
    conn = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    async with aiohttp.ClientSession(connector=conn) as s:

        async def one(u: str) -> None:
            nonlocal total
            async with sem, s.get(u) as r:
                total += len(await r.read())

        t = time.perf_counter()
        await asyncio.gather(*(one(u) for u in urls))
        return time.perf_counter() - t, total


async def _bodies(urls: list[str]) -> list[bytes]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        out = []
        for u in urls:
            async with session.get(u) as r:
                out.append(await r.read())
        return out


def _cpu_limit(cfg, bodies: list[bytes], workers: int) -> float:
    """files/s of the job's own per-image CPU work (validate with one draft decode, training
    copy, content-addressed rename) on the same bodies with the job's thread count, no network:
    the most any downloader doing that work can reach on this machine."""
    from concurrent.futures import ThreadPoolExecutor

    from jobs import cache
    from jobs.artifacts import sha256_bytes

    c = cfg.cache
    params = cache.StoreParams(
        root=cfg.artifacts_dir / "cpu-limit",
        max_pixels=c.max_pixels,
        formats=c.formats,
        short_side=c.train_short_side,
        quality=c.jpeg_quality,
    )
    staging = params.root / "images" / "original"
    staging.mkdir(parents=True)
    tmps = []
    for i, body in enumerate(bodies):
        p = staging / f".tmp-{i}"
        p.write_bytes(body)
        tmps.append((p, sha256_bytes(body)))
    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda a: cache.store_image(a[0], a[1], params), tmps))
    return len(bodies) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--latency-ms", type=float, default=50)
    ap.add_argument("--size-kb", type=int, default=200)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    from cache_fixtures import make_exported_run

    from jobs import cache, db, logs
    from jobs.config import load_config
    from jobs.resources import available_cpus

    logs.configure(json_logs=True, level="WARNING")
    q: mp.Queue = mp.Queue()
    server = mp.Process(target=_serve, args=(q, args.latency_ms / 1000, args.size_kb), daemon=True)
    server.start()
    port, avg = q.get(timeout=120)
    urls = [f"http://127.0.0.1:{port}/img/{i}.jpg" for i in range(args.files)]
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        pgdata = Path(tmp) / "pg"
        url = db.start_embedded(pgdata)
        try:
            env = {
                "DATABASE_URL": url,
                "AIR_ARTIFACTS_DIR": f"{tmp}/artifacts",
                "AIR_DATA_DIR": f"{tmp}/data",
                "AIR__CACHE__ALLOWED_PRIVATE_HOSTS": f'["127.0.0.1:{port}"]',
                "AIR__CACHE__CONCURRENCY": str(args.concurrency),
                "AIR__CACHE__PER_HOST": str(args.concurrency),
                "AIR__CACHE__PROGRESS_EVERY_S": "3600",
            }
            cfg = load_config(REPO / "configs" / "v2_baseline.yaml", env=env)
            db.migrate(cfg)
            run1 = make_exported_run(cfg, urls, version="bench_v2_run_1")
            run2 = make_exported_run(cfg, urls[::-1], version="bench_v2_run_2")

            asyncio.run(_bare(urls[: min(200, len(urls))], args.concurrency))  # warm-up
            bare_s, bare_bytes = asyncio.run(_bare(urls, args.concurrency))
            t = time.perf_counter()
            s1 = cache.run(cfg, run_ref=run1.model_version, env={})
            job_s = time.perf_counter() - t
            t = time.perf_counter()
            s2 = cache.run(cfg, run_ref=run2.model_version, env={})
            resume_s = time.perf_counter() - t
            sample = asyncio.run(_bodies(urls[: min(400, len(urls))]))
            workers = cfg.cache.cpu_workers or available_cpus()
            cpu_fps = _cpu_limit(cfg, sample, workers)
        finally:
            db.stop_embedded(pgdata)
            server.terminate()
    ideal = args.concurrency / (args.latency_ms / 1000)
    out = {
        "files": args.files,
        "avg_kb": round(avg / 1024, 1),
        "concurrency": args.concurrency,
        "latency_ms": args.latency_ms,
        "cpus": available_cpus(),
        "bare_files_per_s": round(args.files / bare_s, 1),
        "bare_vs_ideal": round(args.files / bare_s / ideal, 3),
        "job_files_per_s": round(args.files / job_s, 1),
        "job_mb_per_s": round(s1["fetch"]["bytes"] / job_s / 1e6, 1),
        "job_vs_bare": round(bare_s / job_s, 3),
        "cpu_limit_files_per_s": round(cpu_fps, 1),
        "job_vs_limit": round((args.files / job_s) / min(args.files / bare_s, cpu_fps), 3),
        "job_failed_rows": s1["failed_rows"],
        "resume_requests": s2["fetch"]["requests"],
        "resume_seconds": round(resume_s, 3),
        "resume_rows_per_s": round(args.files / resume_s, 1),
    }
    if args.json:
        print(json.dumps(out))
        return
    print(
        f"files={out['files']} avg={out['avg_kb']} KB c={out['concurrency']} latency={out['latency_ms']} ms cpus={out['cpus']}"
    )
    print(
        f"bare aiohttp loop : {out['bare_files_per_s']:8.1f} files/s  ({out['bare_vs_ideal']:.2f}x of c/latency)"
    )
    print(
        f"cache job         : {out['job_files_per_s']:8.1f} files/s  {out['job_mb_per_s']} MB/s  failed={out['job_failed_rows']}"
    )
    print(f"ratio job/bare    : {out['job_vs_bare']:.2f}x  (goal >= 0.8)")
    print(
        f"cpu limit         : {out['cpu_limit_files_per_s']:8.1f} files/s  (validate + training copy,"
        " same threads, no network)"
    )
    print(
        f"ratio job/limit   : {out['job_vs_limit']:.2f}x  (job vs the lower of bare loop and cpu limit)"
    )
    print(
        f"resume            : {out['resume_rows_per_s']:8.1f} rows/s  requests={out['resume_requests']}  {out['resume_seconds']} s"
    )


if __name__ == "__main__":
    main()
