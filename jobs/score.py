"""`airatings score`: a registered model scores the app's snapshots (a Kubernetes CronJob).

Model: ``--model``, else ``AI_MODEL_VERSION``, else the ``production`` alias. Its bytes come
from ``jobs.registry.read_verified`` (row registered, card and ``model.onnx`` sha256s as
recorded; a mismatch is exit 2) and the one onnxruntime session of the process is built from
those very bytes (``score.threads`` intra-op threads). The capture threshold is the card's
``threshold_policy.threshold`` unless ``AI_CAPTURE_THRESHOLD`` is set (the app's variable).

Work: snapshots without an inference row for that version, newest first (``captured_at``,
then id), within ``--since`` (``24h``, ``2d``, ``90m``, ``1w`` or an ISO time; default
``score.since_hours``) or, with ``--backfill``, every snapshot that has a rating (the
evaluation loop compares the model with people there). Snapshots whose earlier failure for
this version was permanent (a bad image, a 404) are not retried unless ``--retry-failed``;
transient ones (timeouts, 5xx) are. Sharded like the cache: ``--shard I/N`` or
``JOB_COMPLETION_INDEX``/``JOB_COMPLETIONS``; shard I takes the snapshots with
``id % N = I``, under an advisory lock per (version, shard), so N processes score each
snapshot once and a second copy of one shard exits 0 saying so. The work list (ids, newest
first) is read once at the start, 8 bytes an id, and each page of ids is re-checked when its
turn comes (another shard or the app's cron may have scored it meanwhile): paging the window
itself rescanned it for every page, O(N^2) in the window (bench/bench_scale.py).

Images: the cached original when the image index (``image_cache``) has the URL and the file
is there, else downloaded by the cache's fetcher (``jobs.fetch.Fetcher``: URL policy, size
cap, retries) into a temp file that is removed after reading; decoded by
``jobs.images.load_image`` (the one decode contract: EXIF orientation, RGB, transparency on
white, pixel cap) in a thread pool while onnxruntime scores the previous batch. The graph
resizes (docs/contracts.md), so the full frame goes in; images of one size share a call.

Writes, per batch of ``score.batch_size`` snapshots, in one transaction: the
``snapshot_ai_inferences`` rows (``on conflict (snapshot_id, model_version) do nothing``:
a re-run, another shard or the app's own cron having scored it first adds nothing), the
failures (``score_failures``: reason, detail, transient, attempts) and each affected
webcam's ``ai_rating``/``ai_model_version`` through ``refresh_webcam_ai`` (jobs/grants.py:
its newest scored snapshot, never over a newer model's value). A bad image or a non-finite
output fails that snapshot, not the batch. Runs as ``airatings_score`` (least privilege).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import math
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs import calibration, db, logs, paths, registry
from jobs.errors import InputError

if TYPE_CHECKING:
    import psycopg

    from jobs.config import Config

_SINCE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([mhdw])\s*$")
_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class Snapshot:
    id: int
    webcam_id: int
    url: str | None
    captured_at: dt.datetime


@dataclass
class Failure:
    reason: str
    detail: str
    transient: bool


# ---- inputs -------------------------------------------------------------------------------


def parse_since(text: str, now: dt.datetime) -> dt.datetime:
    """``90m``, ``24h``, ``2d``, ``1w`` back from ``now``, or an ISO date/time (UTC if it
    names no zone)."""
    m = _SINCE.match(text)
    if m:
        return now - dt.timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise InputError(
            f"--since {text!r}: expected a duration (90m, 24h, 2d, 1w) or an ISO date/time"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def model_version(cfg: Config, model: str | None) -> tuple[str, str]:
    """(version, where it came from): ``--model``, ``AI_MODEL_VERSION``, the production alias."""
    if model:
        return model, "--model"
    env = os.environ.get("AI_MODEL_VERSION", "").strip()
    if env:
        return env, "AI_MODEL_VERSION"
    registry.require_tables(cfg)
    with db.connect(cfg, autocommit=True) as conn:
        prod = registry.current(conn, cfg)
    if prod is None:
        raise InputError(
            "no model to score with: no 'production' alias (airatings models promote VERSION) "
            "and AI_MODEL_VERSION is not set"
        )
    return prod, "production alias"


def capture_threshold(card: dict[str, Any]) -> float:
    env = os.environ.get("AI_CAPTURE_THRESHOLD", "").strip()
    if env:
        try:
            value = float(env)
        except ValueError:
            value = math.nan
        if not 0 <= value <= 5:
            raise InputError(f"AI_CAPTURE_THRESHOLD={env!r}: expected a number from 0 to 5")
        return value
    return float(card["threshold_policy"]["threshold"])


# ---- the model ------------------------------------------------------------------------------


class Model:
    """One onnxruntime session on verified bytes; scores lists of uint8 HWC arrays."""

    def __init__(self, data: bytes, card: dict[str, Any], threads: int, max_batch: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # no busy-waiting between calls: the decode threads need those cores meanwhile
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        self.input = card["inputs"][0]["name"]
        self.output = card["outputs"][0]["name"]
        self.version = card["model_version"]
        self.knots = card["calibration"]
        self.card = card
        self.max_batch = max_batch

    def raw(self, arrays: list[np.ndarray]) -> np.ndarray:
        """raw_score per array; arrays of one shape go through one call (up to max_batch)."""
        out = np.full(len(arrays), np.nan, dtype=np.float64)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, a in enumerate(arrays):
            by_shape.setdefault(a.shape, []).append(i)
        for idx in by_shape.values():
            for start in range(0, len(idx), self.max_batch):
                chunk = idx[start : start + self.max_batch]
                batch = np.stack([arrays[i] for i in chunk])
                (res,) = self.session.run([self.output], {self.input: batch})
                out[chunk] = np.asarray(res, dtype=np.float64).reshape(len(chunk))
        return out


# ---- images --------------------------------------------------------------------------------


def _decode(limits: tuple[int, tuple[str, ...]], data: bytes) -> np.ndarray | Failure:
    """``load_image`` under the model's decode limits (max pixels, formats)."""
    from jobs.images import ImageRejected, load_image

    try:
        img = load_image(data, max_pixels=limits[0], formats=limits[1])
    except ImageRejected as exc:
        return Failure(exc.reason, str(exc)[:500], transient=False)
    return np.asarray(img, dtype=np.uint8)


def decode_limits(cfg: Config, card: dict[str, Any]) -> tuple[int, tuple[str, ...]]:
    """The card's decode limits (what every scorer of this model applies: the Node scorer
    reads the same), else the config's for a card that predates them."""
    pre = card.get("preprocessing") or {}
    return (
        int(pre.get("max_pixels") or cfg.cache.max_pixels),
        tuple(pre.get("formats") or cfg.cache.formats),
    )


async def _fetch_many(cfg: Config, urls: list[str], tmp: Path) -> dict[str, bytes | Failure]:
    from jobs.cache import _head_check, is_transient_reason
    from jobs.fetch import Fetcher, FetchFailed

    out: dict[str, bytes | Failure] = {}
    check = _head_check(tuple(cfg.cache.formats))
    async with Fetcher.from_config(cfg) as fetcher:

        async def one(url: str) -> None:
            try:
                got = await fetcher.fetch(url, tmp, head_check=check)
            except FetchFailed as exc:
                out[url] = Failure(exc.reason, exc.detail[:500], is_transient_reason(exc.reason))
                return
            try:
                out[url] = got.path.read_bytes()
            finally:
                with contextlib.suppress(FileNotFoundError):
                    got.path.unlink()

        try:
            await asyncio.gather(*(one(u) for u in dict.fromkeys(urls)))
        finally:
            fetcher.remove_temp_bodies()
    return out


class Images:
    """Bytes of each snapshot's image: the cached original if the index knows the URL and the
    file is there, else a download (module doc)."""

    def __init__(self, cfg: Config, conn: psycopg.Connection, tmp: Path) -> None:
        from jobs.cache import ImageIndex

        self.cfg = cfg
        self.index = ImageIndex(cfg, conn)
        self.images = paths.of(cfg).images
        self.tmp = tmp
        self.counts: Counter[str] = Counter()

    def fetch(self, snaps: list[Snapshot]) -> dict[int, bytes | Failure]:
        out: dict[int, bytes | Failure] = {}
        wanted = [s for s in snaps if s.url and s.url.strip()]
        for s in snaps:
            if not (s.url and s.url.strip()):
                out[s.id] = Failure("missing_url", "the snapshot has no image URL", False)
        known = self.index.lookup([s.url for s in wanted if s.url])
        remote: list[Snapshot] = []
        for s in wanted:
            row = known.get(s.url or "")
            if row is not None:
                try:
                    out[s.id] = self.images.original(row.sha256, row.ext).read_bytes()
                    self.counts["cached"] += 1
                    continue
                except FileNotFoundError:
                    pass  # the index outlived the file: download it again
            remote.append(s)
        if remote:
            got = asyncio.run(_fetch_many(self.cfg, [s.url for s in remote if s.url], self.tmp))
            for s in remote:
                out[s.id] = got[s.url or ""]
            self.counts["downloaded"] += sum(1 for s in remote if isinstance(out[s.id], bytes))
        return out


# ---- the database ----------------------------------------------------------------------------


class Store:
    """The scorer's reads and writes (module doc), on one connection."""

    def __init__(self, cfg: Config, conn: psycopg.Connection, version: str) -> None:
        from psycopg import sql

        self.cfg, self.conn, self.version = cfg, conn, version
        a, m = sql.Identifier(cfg.database.app_schema), sql.Identifier(cfg.database.ml_schema)
        self.a, self.m = a, m
        if (
            conn.execute(
                "select to_regprocedure(%s)",
                (
                    f"{sql.Identifier(cfg.database.ml_schema).as_string(conn)}"
                    ".refresh_webcam_ai(bigint[], text, bigint[])",
                ),
            ).fetchone()[0]
            is None
        ):
            raise InputError(
                "the scorer's database side is missing (refresh_webcam_ai, the inference key); "
                "run 'airatings migrate' once the app's tables exist"
            )

    def window(self, since: dt.datetime | None, backfill: bool) -> Any:
        from psycopg import sql

        if backfill:
            return sql.SQL(
                "exists (select 1 from {a}.webcam_snapshot_ratings r where r.snapshot_id = s.id)"
            ).format(a=self.a)
        return sql.SQL("s.captured_at >= {}").format(sql.Literal(since))

    def _unscored(self, retry_failed: bool) -> Any:
        from psycopg import sql

        return sql.SQL(
            "not exists (select 1 from {a}.snapshot_ai_inferences i"
            " where i.snapshot_id = s.id and i.model_version = %(v)s) {failed}"
        ).format(
            a=self.a,
            failed=sql.SQL("")
            if retry_failed
            else sql.SQL(
                "and not exists (select 1 from {m}.score_failures f where f.snapshot_id = s.id"
                " and f.model_version = %(v)s and not f.transient)"
            ).format(m=self.m),
        )

    def work(
        self, window: Any, shard: tuple[int, int], retry_failed: bool, limit: int | None
    ) -> np.ndarray:
        """The ids to score, newest first (captured_at, then id), read once: one scan of the
        window, streamed into 8 bytes an id. (Paging the window itself by keyset re-ran the
        scan and the anti-joins for every page: without an index on captured_at, O(N) a page
        and O(N^2) a run.)"""
        from psycopg import sql

        q = sql.SQL(
            "select s.id from {a}.webcam_snapshots s"
            " where {window} and mod(s.id, %(n)s) = %(i)s and {unscored}"
            " order by s.captured_at desc, s.id desc {limit}"
        ).format(
            a=self.a,
            window=window,
            unscored=self._unscored(retry_failed),
            limit=sql.SQL("limit %(limit)s") if limit is not None else sql.SQL(""),
        )
        params = {"n": shard[1], "i": shard[0], "v": self.version, "limit": limit}
        with self.conn.cursor() as cur:
            return np.fromiter((row[0] for row in cur.stream(q, params)), dtype=np.int64)

    def page(self, ids: list[int], retry_failed: bool) -> list[Snapshot]:
        """These snapshots, in work order, less those scored (or failed for good) since
        :meth:`work` read them: another shard or the app's cron may have been first."""
        from psycopg import sql

        q = sql.SQL(
            "select s.id, s.webcam_id, s.firebase_url, s.captured_at"
            " from {a}.webcam_snapshots s where s.id = any(%(ids)s) and {unscored}"
            " order by s.captured_at desc, s.id desc"
        ).format(a=self.a, unscored=self._unscored(retry_failed))
        params = {"ids": ids, "v": self.version}
        return [Snapshot(*row) for row in self.conn.execute(q, params)]

    def already_scored(self, window: Any, shard: tuple[int, int]) -> int:
        from psycopg import sql

        (n,) = self.conn.execute(
            sql.SQL(
                "select count(*) from {a}.webcam_snapshots s where {window}"
                " and mod(s.id, %(n)s) = %(i)s and exists (select 1 from"
                " {a}.snapshot_ai_inferences i where i.snapshot_id = s.id and i.model_version = %(v)s)"
            ).format(a=self.a, window=window),
            {"n": shard[1], "i": shard[0], "v": self.version},
        ).fetchone()
        return int(n)

    def write(
        self,
        scored: list[tuple[Snapshot, float, float, bool]],
        failed: list[tuple[Snapshot, Failure]],
    ) -> tuple[int, int]:
        """One transaction: inference rows, failures, webcam fields. Returns (inserted, webcams
        updated)."""
        from psycopg import sql

        v = self.version
        with self.conn.transaction():
            db.check_locks()  # a lost shard lock: a twin may be scoring too; commit nothing
            inserted = 0
            if scored:
                rows = self.conn.execute(
                    sql.SQL(
                        "insert into {a}.snapshot_ai_inferences"
                        " (snapshot_id, webcam_id, model_version, raw_score, ai_rating, gate_passed)"
                        " select * from unnest(%s::bigint[], %s::bigint[], %s::text[],"
                        " %s::float8[], %s::float8[], %s::bool[])"
                        " on conflict (snapshot_id, model_version) do nothing returning snapshot_id"
                    ).format(a=self.a),
                    (
                        [s.id for s, *_ in scored],
                        [s.webcam_id for s, *_ in scored],
                        [v] * len(scored),
                        [r for _, r, _, _ in scored],
                        [ai for _, _, ai, _ in scored],
                        [g for *_, g in scored],
                    ),
                ).fetchall()
                inserted = len(rows)
                self.conn.execute(
                    sql.SQL(
                        "delete from {m}.score_failures where model_version = %s"
                        " and snapshot_id = any(%s)"
                    ).format(m=self.m),
                    (v, [s.id for s, *_ in scored]),
                )
            if failed:
                self.conn.execute(
                    sql.SQL(
                        "insert into {m}.score_failures"
                        " (snapshot_id, model_version, reason, detail, transient)"
                        " select * from unnest(%s::bigint[], %s::text[], %s::text[], %s::text[],"
                        " %s::bool[])"
                        " on conflict (snapshot_id, model_version) do update set"
                        " reason = excluded.reason, detail = excluded.detail,"
                        " transient = excluded.transient, attempts = score_failures.attempts + 1,"
                        " last_failed_at = now()"
                    ).format(m=self.m),
                    (
                        [s.id for s, _ in failed],
                        [v] * len(failed),
                        [f.reason for _, f in failed],
                        [f.detail for _, f in failed],
                        [f.transient for _, f in failed],
                    ),
                )
            webcams = sorted({s.webcam_id for s, *_ in scored})
            updated = 0
            if webcams:
                (updated,) = self.conn.execute(
                    # the batch's snapshots: the function compares their rows with each
                    # webcam's newest so far instead of reading its whole history
                    sql.SQL("select {m}.refresh_webcam_ai(%s::bigint[], %s, %s::bigint[])").format(
                        m=self.m
                    ),
                    (webcams, v, [s.id for s, *_ in scored]),
                ).fetchone()
        return inserted, int(updated)


# ---- the job ---------------------------------------------------------------------------------


def run(
    cfg: Config,
    *,
    model: str | None = None,
    since: str | None = None,
    backfill: bool = False,
    shard: str | None = None,
    limit: int | None = None,
    retry_failed: bool = False,
) -> dict[str, Any]:
    """Score new (or, with ``backfill``, every rated) snapshots with a registered model;
    returns the summary (module doc)."""
    from jobs.cache import parse_shard
    from jobs.resources import available_cpus

    log = logs.get_logger()
    started = time.monotonic()
    if backfill and since:
        raise InputError("--since and --backfill exclude each other")
    if limit is not None and limit < 1:
        raise InputError(f"--limit {limit}: expected at least 1")
    shard_ix = parse_shard(shard, os.environ, job="score")
    now = dt.datetime.now(dt.UTC)
    since_at = None if backfill else parse_since(since or f"{cfg.score.since_hours:g}h", now)
    version, source = model_version(cfg, model)
    data, card = registry.read_verified(cfg, version)  # sha256 checked before any session
    threshold = capture_threshold(card)
    threads = cfg.score.threads or available_cpus()
    decode_threads = cfg.score.decode_threads or threads
    logs.bind(model_version=version)
    base = {
        "model_version": version,
        "model_from": source,
        "shard": f"{shard_ix[0]}/{shard_ix[1]}",
        "window": "backfill (rated snapshots)" if backfill else f"since {since_at.isoformat()}",
        "threshold": threshold,
    }
    with db.job_lock(cfg, "score", version, f"{shard_ix[0]}/{shard_ix[1]}") as held:
        if not held:
            log.info("score_skipped", reason="another scorer holds this version and shard")
            return base | {
                "status": "skipped",
                "reason": f"another 'airatings score' is scoring {version} shard {base['shard']}",
            }
        the_model = Model(data, card, threads, cfg.score.max_batch)
        tmp = Path(tempfile.mkdtemp(prefix="score-", dir=_tmp_root(cfg)))
        try:
            with (
                db.connect(cfg, autocommit=True) as conn,
                concurrent.futures.ThreadPoolExecutor(decode_threads) as pool,
            ):
                store = Store(cfg, conn, version)
                window = store.window(since_at, backfill)
                already = store.already_scored(window, shard_ix)
                totals = _score_pages(
                    cfg, store, Images(cfg, conn, tmp), the_model, pool, window, shard_ix,
                    limit, retry_failed, threshold,
                )  # fmt: skip
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.monotonic() - started
    summary = (
        base
        | totals
        | {
            "status": "scored",
            "already_scored": already,
            "seconds": round(seconds, 3),
            "images_per_s": round(totals["scored"] / totals["busy_s"], 2)
            if totals["busy_s"]
            else None,
        }
    )
    log.info(
        "scoring_finished",
        scored=summary["scored"],
        failed=summary["failed"],
        skipped=summary["skipped"],
        webcams_updated=summary["webcams_updated"],
        images_per_s=summary["images_per_s"],
    )
    return summary


def _tmp_root(cfg: Config) -> Path:
    root = cfg.data_dir / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _score_pages(
    cfg: Config,
    store: Store,
    images: Images,
    model: Model,
    pool: concurrent.futures.Executor,
    window: Any,
    shard: tuple[int, int],
    limit: int | None,
    retry_failed: bool,
    threshold: float,
) -> dict[str, Any]:
    """Page through the work; page k+1's images decode while page k is scored and written."""
    log = logs.get_logger()
    limits = decode_limits(cfg, model.card)
    scored = skipped = gate_passed = webcams_updated = 0
    failed: Counter[str] = Counter()
    busy = 0.0
    pending: tuple[list[Snapshot], dict[int, Any]] | None = None
    t0 = time.monotonic()
    ids = store.work(window, shard, retry_failed, limit)
    busy += time.monotonic() - t0
    at = 0  # ids[:at] were paged

    def prepare() -> tuple[list[Snapshot], dict[int, Any]] | None:
        nonlocal at
        page: list[Snapshot] = []
        while not page and at < len(ids):
            chunk = ids[at : at + cfg.score.batch_size].tolist()
            at += len(chunk)
            page = store.page(chunk, retry_failed)
        if not page:
            return None
        fetched = images.fetch(page)
        work = {
            sid: pool.submit(_decode, limits, got) if isinstance(got, bytes) else got
            for sid, got in fetched.items()
        }
        return page, work

    def finish(page: list[Snapshot], work: dict[int, Any]) -> None:
        nonlocal scored, skipped, gate_passed, webcams_updated
        ok: list[tuple[Snapshot, np.ndarray]] = []
        bad: list[tuple[Snapshot, Failure]] = []
        for s in page:
            got = work[s.id]
            got = got.result() if isinstance(got, concurrent.futures.Future) else got
            (bad.append((s, got)) if isinstance(got, Failure) else ok.append((s, got)))
        raw = model.raw([a for _, a in ok]) if ok else np.zeros(0)
        ai = calibration.apply(model.knots, raw) if ok else np.zeros(0)
        rows = []
        for (s, _), r, a in zip(ok, raw.tolist(), ai.tolist(), strict=True):
            if not (math.isfinite(r) and math.isfinite(a)):
                bad.append((s, Failure("non_finite_output", f"raw_score {r}", False)))
                continue
            rows.append((s, r, a, a >= threshold))
        inserted, updated = store.write(rows, bad)
        scored += inserted
        skipped += len(rows) - inserted
        gate_passed += sum(1 for *_, g in rows if g)
        webcams_updated += updated
        failed.update(f.reason for _, f in bad)
        log.info("batch_scored", scored=inserted, failed=len(bad), webcams_updated=updated)

    while True:
        t0 = time.monotonic()
        prepared = prepare()
        if pending is not None:
            finish(*pending)
        busy += time.monotonic() - t0
        if prepared is None:
            break
        pending = prepared
    return {
        "scored": scored,
        "skipped": skipped,
        "failed": sum(failed.values()),
        "failed_by_reason": dict(sorted(failed.items())),
        "gate_passed": gate_passed,
        "webcams_updated": webcams_updated,
        "images": dict(images.counts),
        "busy_s": round(busy, 3),
    }
