"""Fixtures for the image cache and fetch tests: a real aiohttp server on loopback (in its own
thread and event loop) with fault endpoints and counters, test images in every awkward mode,
and an exported run (run row + manifest Parquet files in the shared export contract).

Import explicitly: ``from cache_fixtures import http_server, images, make_exported_run``.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from PIL import Image

from jobs import db, paths, runs

# ---- images ------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(w: int, h: int, seed: int = 0) -> Image.Image:
    """A smooth colour picture (distinct per seed) so JPEG sizes are realistic."""
    import numpy as np

    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack(
        [
            (x * 255 // max(w - 1, 1) + seed * 37) % 256,
            (y * 255 // max(h - 1, 1) + seed * 11) % 256,
            ((x + y) * 3 + seed * 53) % 256,
        ],
        axis=-1,
    ).astype("uint8")
    return Image.fromarray(arr, "RGB")


def jpeg(w: int = 640, h: int = 360, seed: int = 0, quality: int = 90) -> bytes:
    return encode(gradient(w, h, seed), "JPEG", quality=quality)


def odd_images() -> dict[str, bytes]:
    """Valid pictures in every mode the normaliser must handle."""
    cmyk = encode(gradient(320, 200, 1).convert("CMYK"), "JPEG", quality=90)
    i16 = Image.new("I;16", (64, 48))
    for x in range(64):
        for y in range(48):
            i16.putpixel((x, y), x * 1000)
    p = Image.new("P", (64, 48), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    for x in range(32, 64):
        for y in range(48):
            p.putpixel((x, y), 1)
    rgba = Image.new("RGBA", (64, 48), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 32, 48))
    # EXIF orientation 6 (rotate 90 cw to display): stored 80x40, displayed 40x80.
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = encode(gradient(80, 40, 2), "JPEG", quality=90, exif=exif.tobytes())
    frames = [Image.new("P", (40, 30), i) for i in range(3)]
    for i, f in enumerate(frames):
        f.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
        f.paste(i, (0, 0, 40, 30))
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {
        "cmyk.jpg": cmyk,
        "i16.png": encode(i16, "PNG"),
        "p_transparent.png": encode(p, "PNG", transparency=0),
        "rgba.png": encode(rgba, "PNG"),
        "exif_rotated.jpg": rotated,
        "animated.gif": gif.getvalue(),
        "gray.png": encode(gradient(50, 40, 3).convert("L"), "PNG"),
        "webp.webp": encode(gradient(60, 40, 4), "WEBP", quality=90),
    }


# ---- the loopback server -----------------------------------------------------------------------


@dataclass
class Server:
    base: str
    port: int
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    hits: Counter = field(default_factory=Counter)  # path -> requests
    active: int = 0
    max_active: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def add(self, name: str, data: bytes, content_type: str = "image/jpeg") -> str:
        self.files[name] = (data, content_type)
        return self.url(f"/img/{name}")

    @property
    def total_requests(self) -> int:
        return sum(self.hits.values())

    def reset(self) -> None:
        with self.lock:
            self.hits.clear()
            self.max_active = 0


def _build_app(srv: Server) -> web.Application:
    async def count(request: web.Request, handler: Any) -> web.StreamResponse:
        # Concurrency is measured on /slow/ only (a dripping handler from an earlier test may
        # still be sleeping server-side after its client gave up).
        slow = request.path.startswith("/slow/")
        with srv.lock:
            srv.hits[request.path_qs] += 1
            if slow:
                srv.active += 1
                srv.max_active = max(srv.max_active, srv.active)
        try:
            return await handler(request)
        finally:
            if slow:
                with srv.lock:
                    srv.active -= 1

    app = web.Application(middlewares=[web.middleware(count)])
    routes = web.RouteTableDef()

    def image(name: str) -> web.Response:
        if name not in srv.files:
            return web.Response(status=404, text="not found")
        data, ctype = srv.files[name]
        return web.Response(body=data, content_type=ctype)

    @routes.get("/img/{name}")
    async def img(request: web.Request) -> web.Response:
        return image(request.match_info["name"])

    @routes.get("/slow/{name}")
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.15)
        return image(request.match_info["name"])

    @routes.get("/hang/{key}")
    async def hang(request: web.Request) -> web.Response:
        # Answers nothing for 5 s: with a short cache.total_timeout_s, a timeout every time.
        await asyncio.sleep(5)
        return web.Response(status=504, text="too late")

    @routes.get("/status/{code}")
    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="error page")

    @routes.get("/flaky/{key}/{fails}/{code}/{name}")
    async def flaky(request: web.Request) -> web.Response:
        # The first <fails> requests of this exact path fail with <code>, then the image.
        if srv.hits[request.path_qs] <= int(request.match_info["fails"]):
            return web.Response(status=int(request.match_info["code"]), text="try later")
        return image(request.match_info["name"])

    @routes.get("/retry-after/{key}/{value}/{name}")
    async def retry_after(request: web.Request) -> web.Response:
        if srv.hits[request.path_qs] <= 1:
            value = request.query.get("v", request.match_info["value"])
            code = int(request.query.get("code", "429"))
            return web.Response(status=code, headers={"Retry-After": value}, text="slow down")
        return image(request.match_info["name"])

    @routes.get("/drip")
    async def drip(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "image/jpeg", "Content-Length": "100000"}
        )
        await resp.prepare(request)
        for b in jpeg(64, 64)[:60]:
            await resp.write(bytes([b]))
            await asyncio.sleep(1.0)
        return resp

    @routes.get("/short-body")
    async def short_body(request: web.Request) -> web.StreamResponse:
        # Declares more bytes than it sends, then closes: a reset mid-body.
        data = jpeg(64, 64)
        resp = web.StreamResponse(
            headers={"Content-Type": "image/jpeg", "Content-Length": str(len(data) + 5000)}
        )
        await resp.prepare(request)
        await resp.write(data[: len(data) // 2])
        request.transport.close()
        return resp

    @routes.get("/gzip-bomb")
    async def gzip_bomb(request: web.Request) -> web.Response:
        # ~50 KB on the wire, 50 MB once inflated.
        body = _GZIP_BOMB
        return web.Response(
            body=body, headers={"Content-Type": "image/jpeg", "Content-Encoding": "gzip"}
        )

    @routes.get("/huge-declared")
    async def huge_declared(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "image/jpeg", "Content-Length": str(10**10)}
        )
        await resp.prepare(request)
        await resp.write(b"\xff\xd8\xff" + b"\0" * 1000)
        return resp

    @routes.get("/redirect")
    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"])

    @routes.get("/loop/{n}")
    async def loop(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"/loop/{int(request.match_info['n']) + 1}")

    @routes.get("/json-as-jpeg")
    async def json_as_jpeg(request: web.Request) -> web.Response:
        return web.Response(body=json.dumps({"error": "nope"}).encode(), content_type="image/jpeg")

    @routes.get("/html")
    async def html(request: web.Request) -> web.Response:
        return web.Response(
            text="<html><body>Service unavailable</body></html>", content_type="text/html"
        )

    app.add_routes(routes)
    return app


_GZIP_BOMB = gzip.compress(b"\xff\xd8\xff\xe0" + b"\0" * 50_000_000, compresslevel=9)


def start_server() -> tuple[Server, Any]:
    """Start the server in a daemon thread with its own loop; returns (server, stop())."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    def serve() -> None:
        asyncio.set_event_loop(loop)
        srv = Server(base="", port=0)
        runner = web.AppRunner(_build_app(srv), access_log=None)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        port = runner.addresses[0][1]
        srv.port, srv.base = port, f"http://127.0.0.1:{port}"
        holder.update(srv=srv, runner=runner)
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=serve, name="test-http", daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("test HTTP server did not start")

    def stop() -> None:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    return holder["srv"], stop


@pytest.fixture(scope="module")
def http_server() -> Iterator[Server]:
    srv, stop = start_server()
    try:
        yield srv
    finally:
        stop()


@pytest.fixture
def server(http_server: Server) -> Server:
    http_server.reset()
    return http_server


# ---- an exported run -------------------------------------------------------------------------


def manifest_table(rows: list[dict[str, Any]]):
    """Rows (snapshot_id, firebase_url, split, ...) -> a table in the export manifest contract."""
    import pyarrow as pa

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    rows = sorted(rows, key=lambda r: r["snapshot_id"])
    n = len(rows)
    from jobs.manifests import MANIFEST_SCHEMA

    return pa.table(
        {
            "snapshot_id": pa.array([r["snapshot_id"] for r in rows], pa.int64()),
            "firebase_url": pa.array([r["firebase_url"] for r in rows], pa.string()),
            "label_source": pa.array(["calculated_rating"] * n, pa.string()),
            "label_value": pa.array([float(r.get("label_value", 3.0)) for r in rows], pa.float64()),
            "split": pa.array([r["split"] for r in rows], pa.string()),
            "phase": pa.array(
                [("sunrise", "sunset")[r["snapshot_id"] % 2] for r in rows], pa.string()
            ),
            "captured_at": pa.array(
                [t0 + timedelta(hours=r["snapshot_id"]) for r in rows], pa.timestamp("us", tz="UTC")
            ),
            "rating_count": pa.array([3] * n, pa.int32()),
            "is_good": pa.array([r.get("label_value", 3.0) >= 4.0 for r in rows], pa.bool_()),
            "webcam_id": pa.array([r["snapshot_id"] % 5 + 1 for r in rows], pa.int64()),
            "region": pa.array(["alps"] * n, pa.string()),
            "source": pa.array(["test"] * n, pa.string()),
            "rating_std": pa.array([0.5] * n, pa.float64()),
            "rating_hist": pa.array([[0, 0, 1, 1, 1, 0]] * n, pa.list_(pa.int32())),
        },
        schema=MANIFEST_SCHEMA,
    )


def make_exported_run(cfg: Any, urls: list[str | None], *, version: str | None = None) -> runs.Run:
    """Write manifests (snapshot i -> urls[i], splits round-robin 8/1/1), the run row and its
    label rows, as ``airatings export`` leaves them: ``params_json['export']['files']`` records
    each manifest's rows and sha256, and every manifest row is a label row of the run."""
    import hashlib

    import pyarrow.parquet as pq

    from jobs.artifacts import sha256_file

    splits = ["train"] * 8 + ["val", "test"]
    rows = [
        {"snapshot_id": i + 1, "firebase_url": u, "split": splits[i % 10], "label_value": (i % 6)}
        for i, u in enumerate(urls)
    ]
    dataset_hash = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    ddir = paths.of(cfg).dataset(dataset_hash).root
    ddir.mkdir(parents=True, exist_ok=True)
    parts = {"full": rows} | {
        s: [r for r in rows if r["split"] == s] for s in ("train", "val", "test")
    }
    files = {}
    for name, part in parts.items():
        path = ddir / f"manifest_{name}.parquet"
        pq.write_table(manifest_table(part), path)
        files[path.name] = {"rows": len(part), "sha256": sha256_file(path)}
    with db.connect(cfg) as conn:
        n = conn.execute(
            runs.sql.SQL("select count(*) from {}").format(runs.table(cfg, "model_training_runs"))
        ).fetchone()[0]
        version = version or f"test_v2_2026_01_01_{n + 1}"
        export = {"dataset_dir": str(ddir), "dataset_hash": dataset_hash, "files": files}
        run_id = conn.execute(
            runs.sql.SQL(
                "insert into {} (model_version, status, dataset_hash, config_hash, params_json)"
                " values (%s, 'exported', %s, %s, %s) returning id"
            ).format(runs.table(cfg, "model_training_runs")),
            (version, dataset_hash, cfg.config_hash, json.dumps({"export": export})),
        ).fetchone()[0]
        with conn.cursor() as cur:
            cur.executemany(
                runs.sql.SQL(
                    "insert into {} (training_run_id, snapshot_id, label_source, label_value, split)"
                    " values (%s, %s, 'calculated_rating', %s, %s)"
                ).format(runs.table(cfg, "model_training_snapshot_labels")),
                [(run_id, r["snapshot_id"], float(r["label_value"]), r["split"]) for r in rows],
            )
        return runs.get_run(conn, cfg, version)


def cache_files(cfg: Any) -> list[Path]:
    """Every file under <artifacts>/images (temp files included)."""
    root = cfg.artifacts_dir / "images"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
