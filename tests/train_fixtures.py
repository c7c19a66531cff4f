"""A tiny learnable world for train/evaluate tests, written straight to the cache contract.

``make_world(cfg)`` writes a few hundred 64x64 JPEGs whose rating is learnable (warm orange sky
= high, grey = low), the active manifests of a run and its run row at status ``cached``
(dataset_hash, config_hash, params_json), exactly as ``airatings cache`` leaves them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from jobs import db, paths
from jobs.config import Config
from jobs.manifests import ACTIVE_SCHEMA
from jobs.runs import table

MANIFEST_SCHEMA = ACTIVE_SCHEMA  # what the cache writes and training reads

GREY = np.array([118.0, 118.0, 122.0])
ORANGE = np.array([250.0, 128.0, 36.0])


def sky_image(
    value: float, rng: np.random.Generator, size: int = 64, width: int | None = None
) -> bytes:
    """A JPEG whose colour encodes ``value`` (0 grey .. 5 warm orange) plus noise."""
    w = width or size
    t = value / 5.0
    top = GREY * (1 - t) + ORANGE * t
    bottom = top * 0.45 + 20
    ramp = np.linspace(0, 1, size)[:, None, None]
    img = top[None, None, :] * (1 - ramp) + bottom[None, None, :] * ramp
    img = np.broadcast_to(img, (size, w, 3)) + rng.normal(0, 12, (size, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def world_rows(n: int, seed: int = 0, good_threshold: float = 4.0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    rows = []
    base = dt.datetime(2026, 1, 5, tzinfo=dt.UTC)
    for i in range(n):
        true = rng.uniform(0, 5)
        k = int(rng.integers(2, 8))
        ratings = np.clip(np.rint(true + rng.normal(0, 0.6, k)), 0, 5).astype(int)
        hist = np.bincount(ratings, minlength=6).astype(int).tolist()
        label = float(ratings.mean())
        u = (i * 7919) % 100  # a fixed, label-independent split
        split = "train" if u < 70 else ("val" if u < 85 else "test")
        phase = "sunrise" if i % 2 else "sunset"
        captured = base + dt.timedelta(days=int(i % 40), hours=6 if phase == "sunrise" else 18)
        rows.append(
            {
                "snapshot_id": 1000 + i,
                "firebase_url": f"https://example.test/snap/{1000 + i}.jpg",
                "label_source": "manual_review" if i % 50 == 0 else "calculated_rating",
                "label_value": label,
                "split": split,
                "phase": phase,
                "captured_at": captured,
                "rating_count": k,
                "is_good": label >= good_threshold,
                "webcam_id": 1 + i % 6,
                "region": ["north", "south", "coast"][i % 3],
                "source": ["cam_a", "cam_b"][i % 2],
                "rating_std": float(ratings.std(ddof=1)),
                "rating_hist": hist,
            }
        )
    return rows


def write_images(cfg: Config, rows: list[dict[str, Any]], seed: int = 0, size: int = 64) -> None:
    """Write each row's image (original == training copy at this size) and set its paths."""
    rng = np.random.default_rng(seed + 1)
    for r in rows:
        data = sky_image(r["label_value"], rng, size)
        sha = hashlib.sha256(data).hexdigest()
        rel = Path("images") / sha[:2] / f"{sha}.jpg"
        path = cfg.artifacts_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        r["image_sha256"] = sha
        r["image_path"] = str(rel)
        r["train_image_path"] = str(rel)


def write_manifests(cfg: Config, model_version: str, rows: list[dict[str, Any]]) -> Path:
    active = paths.of(cfg).run(model_version).active_dir
    active.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        part = sorted((r for r in rows if r["split"] == split), key=lambda r: r["snapshot_id"])
        tbl = pa.Table.from_pylist(part, schema=MANIFEST_SCHEMA)
        pq.write_table(tbl, active / f"manifest_{split}.parquet")
    return active


def active_files(cfg: Config, model_version: str) -> dict[str, dict[str, Any]]:
    """What the cache step records of the active manifests it wrote: rows and sha256."""
    from jobs.artifacts import sha256_file

    active = paths.of(cfg).run(model_version).active_dir
    return {
        p.name: {"rows": pq.read_metadata(p).num_rows, "sha256": sha256_file(p)}
        for p in sorted(active.glob("manifest_*.parquet"))
    }


def insert_run(cfg: Config, model_version: str, dataset_hash: str, status: str = "cached") -> int:
    """The run row as the cache step leaves it, recording the active manifests on disk."""
    cache = {"ok": True, "active_files": active_files(cfg, model_version)}
    with db.connect(cfg) as conn:
        row = conn.execute(
            db_sql_insert(cfg),
            (
                model_version,
                status,
                dataset_hash,
                cfg.config_hash,
                json.dumps({"export": {"dataset_hash": dataset_hash}, "cache": cache}),
            ),
        ).fetchone()
    return int(row[0])


def recache(cfg: Config, run_id: int, model_version: str, rows: list[dict[str, Any]]) -> None:
    """What a re-run of the cache step does to a run: new active manifests, recorded."""
    from psycopg import sql

    write_manifests(cfg, model_version, rows)
    with db.connect(cfg) as conn:
        conn.execute(
            sql.SQL(
                "update {} set params_json = jsonb_set(params_json, %s::text[], %s::jsonb)"
                " where id = %s"
            ).format(table(cfg, "model_training_runs")),
            (["cache", "active_files"], json.dumps(active_files(cfg, model_version)), run_id),
        )


def db_sql_insert(cfg: Config):
    from psycopg import sql

    return sql.SQL(
        "insert into {} (model_version, status, dataset_hash, config_hash, params_json)"
        " values (%s, %s, %s, %s, %s::jsonb) returning id"
    ).format(table(cfg, "model_training_runs"))


def make_world(
    cfg: Config,
    *,
    n: int = 300,
    seed: int = 0,
    model_version: str = "test_v2_2026_01_01",
    dataset_hash: str = "d" * 64,
    rows: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Images + active manifests + a run row at 'cached'. Returns what was made."""
    if rows is None:
        rows = world_rows(n, seed, cfg.dataset.good_threshold)
        write_images(cfg, rows, seed)
    write_manifests(cfg, model_version, rows)
    run_id = insert_run(cfg, model_version, dataset_hash)
    return {
        "rows": rows,
        "run_id": run_id,
        "model_version": model_version,
        "dataset_hash": dataset_hash,
    }


def run_status(cfg: Config, run_id: int) -> tuple[str, str | None]:
    from psycopg import sql

    with db.connect(cfg) as conn:
        return conn.execute(
            sql.SQL("select status, failure_reason from {} where id = %s").format(
                table(cfg, "model_training_runs")
            ),
            (run_id,),
        ).fetchone()


# Small, fast training settings for tests (input 64, batch 32, random init, no workers).
FAST = {
    "train__weights": "none",
    "train__input_size": 64,
    "train__batch_size": 32,
    "train__epochs": 2,
    "train__num_workers": 0,
    "train__threads": 2,
    "train__lr": 0.003,
    "train__device": "cpu",
}
