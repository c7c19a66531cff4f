"""`airatings review report|import|history`: the evaluation loop (a nightly CronJob).

**report** (``--model-version V``, default production; ``--cycle C``, default today in UTC):
builds dbt's ``fct_disagreements`` and ``rpt_disagreement_by_slice`` (the latest inference per
snapshot and version joined with the human label the export uses), freezes this version's
rows of both into ``review/<cycle>/<version>/`` (Parquet, sha256 in ``review_cycles``) and
computes from the frozen rows, never from live tables again:

- the cycle's evaluation rows in ``model_evaluations`` (``split = 'production_loop'``, this
  ``cycle``): the metrics of :mod:`jobs.metrics` on aiRating vs the label, per slice, with
  seeded bootstrap CIs, plus the share with |error| > 1; too few rows: insufficient data;
- the review set (``review_items``, one per (cycle, version), each item saying why): the
  ``review.top_n`` largest |error|, a seeded random ``review.boundary_n`` from the band
  ``review.boundary_low``..``boundary_high`` of aiRating, and a seeded ``review.holdout_n``
  of snapshots never in a review set before (to measure the selection's bias later);
- ``review.html``: the slice table with bars, the reliability of aiRating, one card per
  item (its cached thumbnail, AI vs human rating, rating count and histogram, phase, webcam,
  a label control) and a client-side CSV export of the filled-in review.

A second report of the same (cycle, version) finds the cycle recorded and reproduces the same
numbers and set from the frozen files (checked against their sha256s); the page is rewritten
when it is missing or changed.

**import FILE.csv**: every row validated (snapshot exists and was in a review set, label a
number in 0..5, reviewer present, no snapshot twice); any bad row rejects the whole file,
listing them; text cells that a spreadsheet would run as a formula (``= + - @``, tab, CR
first) are neutralised with a leading apostrophe. Accepted labels go to ``manual_relabels``
(earlier open relabels of those snapshots superseded), which the export's label precedence
reads (``label_source = 'manual_review'``). The same file twice is ``already_imported``. The
accounting: yield (share of reviewed items whose label changed, and that crossed the good
threshold) and how often the flagged top disagreements were label errors (the new label
nearer the model's aiRating than the old one).

**history**: the cycles' headline rows per version (MAE, ROC AUC, disagreement rate) as a
table and ``review/history.png``; for two versions (``--compare A B``, default production
and the version scored before it) the paired bootstrap of the MAE difference on the
snapshots both scored, with the same labels: "improved", "regressed" or "no detectable
change", with the interval; and how much of it comes from corrected labels (the old
model's inferences against the labels of its last cycle and against today's).
"""

from __future__ import annotations

import base64
import contextlib
import csv
import datetime as dt
import hashlib
import io
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs import db, logs, metrics, paths, registry, report, runs
from jobs.artifacts import atomic_write_parquet, atomic_write_text, sha256_bytes, sha256_file
from jobs.errors import InputError

if TYPE_CHECKING:
    import psycopg

    from jobs.config import Config

SPLIT = "production_loop"
# with their parents: a model changed by an upgrade is rebuilt before it is read
MODELS = "+fct_disagreements +rpt_disagreement_by_slice"
REQUIRED_COLUMNS = ("snapshot_id", "label", "reviewer")
CSV_COLUMNS = ("snapshot_id", "label", "reviewer", "cycle", "model_version", "note")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
HEADLINE = ("mae", "rmse", "bias", "spearman", "roc_auc")
# the order of the review set on the page: the largest disagreements first
REASONS = ("top_disagreement", "boundary_sample", "holdout")


# ---- helpers --------------------------------------------------------------------------------


def _dbt(cfg: Config, name: str) -> Any:
    from psycopg import sql

    return sql.Identifier(cfg.database.dbt_schema, name)


def _app(cfg: Config, name: str) -> Any:
    from psycopg import sql

    return sql.Identifier(cfg.database.app_schema, name)


def _version(cfg: Config, version: str | None) -> str:
    if version:
        return version
    registry.require_tables(cfg)
    with db.connect(cfg, autocommit=True) as conn:
        prod = registry.current(conn, cfg)
    if prod is None:
        raise InputError("no production model: pass --model-version V")
    return prod


def _cycle(cycle: str | None) -> str:
    import re

    cycle = cycle or dt.datetime.now(dt.UTC).date().isoformat()
    if not re.fullmatch(r"[0-9A-Za-z][0-9A-Za-z_.-]{0,63}", cycle):
        raise InputError(f"--cycle {cycle!r}: letters, digits, '_', '.', '-' (at most 64)")
    return cycle


def _rows(conn: psycopg.Connection, query: Any, params: tuple) -> dict[str, list[Any]]:
    cur = conn.execute(query, params)
    names = [d.name for d in cur.description]
    data = cur.fetchall()
    return {n: [r[i] for r in data] for i, n in enumerate(names)}


def _table(columns: dict[str, list[Any]]) -> Any:
    import pyarrow as pa

    return pa.table(columns)


def _seed(cfg: Config, *parts: object) -> np.random.Generator:
    digest = hashlib.sha256("|".join(map(str, (cfg.review.seed, *parts))).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big"))


# ---- report ---------------------------------------------------------------------------------


def report_job(
    cfg: Config, model_version: str | None = None, cycle: str | None = None
) -> dict[str, Any]:
    """`airatings review report` (module doc); returns the JSON summary."""
    from jobs import dbt_runner

    log = logs.get_logger()
    started = time.monotonic()
    version = _version(cfg, model_version)
    cycle = _cycle(cycle)
    logs.bind(model_version=version, cycle=cycle)
    rp = paths.of(cfg).review(cycle, version)
    with db.job_lock(cfg, "review", cycle, version) as held:
        if not held:
            return {"status": "skipped", "reason": f"another review report holds {cycle}/{version}"}
        with db.connect(cfg, autocommit=True) as conn:
            runs.get_run(conn, cfg, version)  # a version this registry knows
            recorded = conn.execute(
                _sql("select data_sha256, slices_sha256, items_sha256, page_sha256, params_json"
                     " from {} where cycle = %s and model_version = %s", runs.table(cfg, "review_cycles")),
                (cycle, version),
            ).fetchone()  # fmt: skip
        if recorded is None:
            # build and read under dbt's relations lock: no other build between them
            with dbt_runner.relations_lock(cfg):
                built = dbt_runner.build(cfg, select=MODELS, lock=False)
                log.info("review_models_built", **built["results"])
                _freeze(cfg, version, rp)
            status = "reported"
        else:
            data_sha, slices_sha = recorded[0], recorded[1]
            runs.verify_recorded(rp.disagreements, data_sha, what="frozen disagreements",
                                        fix="restore it from a backup; the cycle's numbers rest on it")  # fmt: skip
            runs.verify_recorded(rp.slices, slices_sha, what="frozen slice report",
                                 fix="restore it from a backup")  # fmt: skip
            status = "already_reported"
        import pyarrow.parquet as pq

        frozen = pq.read_table(rp.disagreements).to_pydict()
        slices_table = pq.read_table(rp.slices).to_pydict()
        result = _evaluate(cfg, frozen)
        items = (
            _choose(cfg, cycle, version, frozen)
            if recorded is None
            else _items(cfg, cycle, version)
        )
        items_sha = items_sha256(items)
        if recorded is not None and items_sha != recorded[2]:
            raise InputError(
                f"review set {cycle}/{version} changed since it was recorded; refusing"
            )
        page = _page(cfg, cycle, version, frozen, slices_table, result, items)
        page_sha = sha256_bytes(page.encode())
        if not rp.page.is_file() or sha256_file(rp.page) != page_sha:
            db.check_locks()
            atomic_write_text(rp.page, page)
        if recorded is None:
            with db.connect(cfg) as conn, conn.transaction():
                db.check_locks()
                _record(conn, cfg, cycle, version, rp, items, items_sha, page_sha, result)
        elif recorded[3] != page_sha:
            with db.connect(cfg) as conn:
                conn.execute(
                    _sql("update {} set page_sha256 = %s where cycle = %s and model_version = %s",
                         runs.table(cfg, "review_cycles")),
                    (page_sha, cycle, version),
                )  # fmt: skip
    allm = result["metrics"]["all"]
    by_reason: dict[str, int] = {}
    for it in items:
        by_reason[it["reason"]] = by_reason.get(it["reason"], 0) + 1
    summary = {
        "status": status,
        "cycle": cycle,
        "model_version": version,
        "n": result["n"],
        **{k: allm[k]["value"] for k in HEADLINE},
        "mae_ci": [allm["mae"]["ci_low"], allm["mae"]["ci_high"]],
        "disagreement_rate": result["disagreement_rate"],
        "review_items": len(items),
        "review_items_by_reason": by_reason,
        "items_sha256": items_sha,
        "data_sha256": sha256_file(rp.disagreements),
        "page": str(rp.page),
        "seconds": round(time.monotonic() - started, 3),
    }
    log.info("review_reported", n=summary["n"], items=len(items), page=str(rp.page))
    return summary


def items_sha256(items: list[dict[str, Any]]) -> str:
    """The review set's identity: its items in snapshot order, canonical JSON."""
    canonical = sorted(items, key=lambda it: it["snapshot_id"])
    return sha256_bytes(json.dumps(canonical, sort_keys=True, default=str).encode())


def _sql(text: str, *parts: Any) -> Any:
    from psycopg import sql

    return sql.SQL(text).format(*parts)


def _freeze(cfg: Config, version: str, rp: paths.ReviewPaths) -> None:
    """This version's rows of both dbt models (one snapshot of the database), written under
    the cycle's folder."""
    with db.connect(cfg) as conn, conn.transaction():
        conn.execute("set transaction isolation level repeatable read")
        rows = _rows(
            conn,
            _sql("select * from {} where model_version = %s order by snapshot_id",
                 _dbt(cfg, "fct_disagreements")),
            (version,),
        )  # fmt: skip
        slices = _rows(
            conn,
            _sql("select * from {} where model_version = %s order by slice",
                 _dbt(cfg, "rpt_disagreement_by_slice")),
            (version,),
        )  # fmt: skip
    if not rows.get("snapshot_id"):
        raise InputError(
            f"no scored, labelled snapshots for {version}: run 'airatings score --backfill "
            f"--model {version}' first"
        )
    db.check_locks()
    atomic_write_parquet(_table(rows), rp.disagreements)
    atomic_write_parquet(_table(slices), rp.slices)


def _evaluate(cfg: Config, frozen: dict[str, list[Any]]) -> dict[str, Any]:
    """The cycle's metrics from the frozen rows (aiRating vs the label)."""
    y = np.asarray(frozen["label_value"], dtype=np.float64)
    s = np.asarray(frozen["ai_rating"], dtype=np.float64)
    e = cfg.evaluate
    table = {
        "captured_at": frozen["captured_at"],
        "phase": frozen["phase"],
        "region": frozen["region"],
        "source": frozen["source"],
    }
    result = metrics.sliced_metrics(
        y,
        s,
        table,
        cfg.dataset.good_threshold,
        min_test_rows=e.min_test_rows,
        min_slice_size=e.min_slice_size,
        samples=e.bootstrap_samples,
        level=e.ci_level,
        seed=e.seed,
    )
    n = len(y)
    rate = float(np.mean(np.abs(s - y) > 1.0)) if n >= e.min_test_rows else None
    return {
        "n": n,
        "metrics": result,
        "disagreement_rate": rate,
        "calibration": metrics.calibration(y, s) if n else [],
        "good_threshold": cfg.dataset.good_threshold,
    }


def _choose(
    cfg: Config, cycle: str, version: str, frozen: dict[str, list[Any]]
) -> list[dict[str, Any]]:
    """The review set (module doc), deterministic for (cycle, version, review.seed)."""
    r = cfg.review
    ids = np.asarray(frozen["snapshot_id"], dtype=np.int64)
    ai = np.asarray(frozen["ai_rating"], dtype=np.float64)
    y = np.asarray(frozen["label_value"], dtype=np.float64)
    err = np.abs(ai - y)
    chosen: dict[int, dict[str, Any]] = {}

    def add(idx: np.ndarray, reason: str) -> None:
        for rank, i in enumerate(idx.tolist(), start=1):
            sid = int(ids[i])
            if sid not in chosen:
                chosen[sid] = {"snapshot_id": sid, "reason": reason, "item_rank": rank,
                               "ai_rating": float(ai[i]), "label_value": float(y[i]),
                               "abs_error": float(err[i])}  # fmt: skip

    order = np.lexsort((ids, -err))  # largest error first, then snapshot id
    add(order[: r.top_n], "top_disagreement")
    band = np.flatnonzero((ai >= r.boundary_low) & (ai <= r.boundary_high))
    band = np.array([i for i in band if int(ids[i]) not in chosen], dtype=np.int64)
    if band.size:
        pick = _seed(cfg, cycle, version, "band").permutation(band)[: r.boundary_n]
        add(np.sort(pick), "boundary_sample")
    with db.connect(cfg, autocommit=True) as conn:
        seen = {
            row[0]
            for row in conn.execute(
                _sql("select distinct snapshot_id from {}", runs.table(cfg, "review_items"))
            )
        }
        seen |= {
            row[0]
            for row in conn.execute(
                _sql("select distinct snapshot_id from {}", runs.table(cfg, "manual_relabels"))
            )
        }
    fresh = np.array(
        [i for i in range(len(ids)) if int(ids[i]) not in chosen and int(ids[i]) not in seen],
        dtype=np.int64,
    )
    if fresh.size:
        pick = _seed(cfg, cycle, version, "holdout").permutation(fresh)[: r.holdout_n]
        add(np.sort(pick), "holdout")
    return sorted(chosen.values(), key=lambda it: (REASONS.index(it["reason"]), it["item_rank"]))


def _items(cfg: Config, cycle: str, version: str) -> list[dict[str, Any]]:
    with db.connect(cfg, autocommit=True) as conn:
        rows = conn.execute(
            _sql("select snapshot_id, reason, item_rank, ai_rating, label_value, abs_error"
                 " from {} where cycle = %s and model_version = %s", runs.table(cfg, "review_items")),
            (cycle, version),
        ).fetchall()  # fmt: skip
    keys = ("snapshot_id", "reason", "item_rank", "ai_rating", "label_value", "abs_error")
    return sorted(
        (dict(zip(keys, r, strict=True)) for r in rows),
        key=lambda it: (REASONS.index(it["reason"]), it["item_rank"]),
    )


def _record(
    conn: psycopg.Connection,
    cfg: Config,
    cycle: str,
    version: str,
    rp: paths.ReviewPaths,
    items: list[dict[str, Any]],
    items_sha: str,
    page_sha: str,
    result: dict[str, Any],
) -> None:
    conn.execute(
        _sql("insert into {} (cycle, model_version, data_path, data_sha256, slices_sha256,"
             " items_sha256, page_path, page_sha256, params_json)"
             " values (%s, %s, %s, %s, %s, %s, %s, %s, %s)", runs.table(cfg, "review_cycles")),
        (cycle, version, str(rp.disagreements.relative_to(cfg.artifacts_dir)),
         sha256_file(rp.disagreements), sha256_file(rp.slices), items_sha,
         str(rp.page.relative_to(cfg.artifacts_dir)), page_sha,
         json.dumps({"review": cfg.review.model_dump(mode="json"),
                     "evaluate": cfg.evaluate.model_dump(mode="json")})),
    )  # fmt: skip
    with conn.cursor() as cur:
        cur.executemany(
            _sql("insert into {} (cycle, model_version, snapshot_id, reason, item_rank,"
                 " ai_rating, label_value, abs_error) values (%s, %s, %s, %s, %s, %s, %s, %s)",
                 runs.table(cfg, "review_items")),
            [(cycle, version, it["snapshot_id"], it["reason"], it["item_rank"], it["ai_rating"],
              it["label_value"], it["abs_error"]) for it in items],
        )  # fmt: skip
        rows = []
        for slice_name, ms in result["metrics"].items():
            for metric, m in ms.items():
                rows.append((slice_name, metric, m["value"], m["status"], m["n"], m["ci_low"],
                             m["ci_high"]))  # fmt: skip
        rate = result["disagreement_rate"]
        rows.append(("all", "share_abs_error_gt_1", rate, "ok" if rate is not None else
                     "insufficient_data", result["n"], None, None))  # fmt: skip
        cur.executemany(
            _sql("insert into {} (model_version, split, slice, metric, value, status, n, ci_low,"
                 " ci_high, cycle) values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                 " on conflict (model_version, split, slice, metric, cycle) do nothing",
                 runs.table(cfg, "model_evaluations")),
            [(version, SPLIT, *r, cycle) for r in rows],
        )  # fmt: skip


# ---- the page -------------------------------------------------------------------------------


def _page(
    cfg: Config,
    cycle: str,
    version: str,
    frozen: dict[str, list[Any]],
    slices: dict[str, list[Any]],
    result: dict[str, Any],
    items: list[dict[str, Any]],
) -> str:
    """review.html: self-contained (thumbnails and the plot as data URIs)."""
    by_id = {sid: i for i, sid in enumerate(frozen["snapshot_id"])}
    ids = [it["snapshot_id"] for it in items]
    info = _snapshot_info(cfg, ids)
    max_mae = max([v for v in slices.get("mae", []) if v is not None] or [1.0])
    slice_rows = [
        {
            "slice": slices["slice"][i],
            "n": slices["n"][i],
            "mae": slices["mae"][i],
            "bias": slices["bias"][i],
            "share": slices["share_abs_error_gt_1"][i],
            "mean_predicted": slices["mean_predicted"][i],
            "mean_human": slices["mean_human"][i],
            "bar": 0 if slices["mae"][i] is None else round(100 * slices["mae"][i] / max_mae),
        }
        for i in range(len(slices.get("slice", [])))
    ]
    cards = []
    for it in items:
        sid = it["snapshot_id"]
        row = by_id.get(sid)
        meta = info.get(sid, {})
        cards.append(
            it
            | {
                "phase": frozen["phase"][row] if row is not None else None,
                "captured_at": str(frozen["captured_at"][row]) if row is not None else None,
                "rating_count": frozen["rating_count"][row] if row is not None else None,
                "webcam": meta.get("webcam"),
                "histogram": meta.get("histogram", [0] * 6),
                "thumbnail": meta.get("thumbnail"),
            }
        )
    return report.render(
        "review.html",
        title=f"Review {cycle}: {version}",
        cycle=cycle,
        version=version,
        result=result,
        allm=result["metrics"]["all"],
        slice_rows=slice_rows,
        min_slice=cfg.evaluate.min_slice_size,
        plot=_calibration_plot(result),
        cards=cards,
        csv_columns=list(CSV_COLUMNS),
        threshold=cfg.dataset.good_threshold,
    )


def _calibration_plot(result: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.8))
    ax.plot([0, 5], [0, 5], color="grey", lw=1)
    cal = [c for c in result["calibration"] if c["n"]]
    if cal:
        ax.plot([c["mean_predicted"] for c in cal], [c["mean_human"] for c in cal], marker="o")
        for c in cal:
            ax.annotate(str(c["n"]), (c["mean_predicted"], c["mean_human"]), fontsize=8)
    ax.set(xlabel="mean aiRating (bucket)", ylabel="mean human", xlim=(0, 5), ylim=(0, 5))
    return report.figure_png(fig)


def _snapshot_info(cfg: Config, ids: list[int]) -> dict[int, dict[str, Any]]:
    """Per snapshot: webcam name, rating histogram 0..5, thumbnail data URI (the cache's
    training copy, else the original, else none)."""
    from jobs.cache import ImageIndex

    out: dict[int, dict[str, Any]] = {sid: {"histogram": [0] * 6} for sid in ids}
    if not ids:
        return out
    with db.connect(cfg, autocommit=True) as conn:
        snaps = conn.execute(
            _sql("select s.id, s.firebase_url, w.name from {} s join {} w on w.id = s.webcam_id"
                 " where s.id = any(%s)", _app(cfg, "webcam_snapshots"), _app(cfg, "webcams")),
            (ids,),
        ).fetchall()  # fmt: skip
        for sid, value, n in conn.execute(
            # one rating per person (their latest), like the labels
            _sql("select snapshot_id, round(rating)::int, count(*) from (select distinct on"
                 " (snapshot_id, user_id) snapshot_id, rating from {} where snapshot_id = any(%s)"
                 " order by snapshot_id, user_id, created_at desc, id desc) r group by 1, 2",
                 _app(cfg, "webcam_snapshot_ratings")),
            (ids,),
        ):  # fmt: skip
            if 0 <= value <= 5:
                out[sid]["histogram"][value] = int(n)
        index = ImageIndex(cfg, conn).lookup([u for _, u, _ in snaps if u])
    images = paths.of(cfg).images
    for sid, url, name in snaps:
        out[sid]["webcam"] = name
        row = index.get(url or "")
        if row is None:
            continue
        for path, mime in (
            (images.train_copy(row.sha256, cfg.cache.train_short_side), "image/jpeg"),
            (
                images.original(row.sha256, row.ext),
                f"image/{'jpeg' if row.ext == 'jpg' else row.ext}",
            ),
        ):
            if path.is_file():
                out[sid]["thumbnail"] = (
                    f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()
                )
                break
    return out


# ---- import ---------------------------------------------------------------------------------


def _neutralise(text: str) -> tuple[str, bool]:
    if text.startswith(FORMULA_START):
        return "'" + text, True
    return text, False


def import_job(cfg: Config, file: Path) -> dict[str, Any]:
    """`airatings review import FILE.csv` (module doc)."""
    log = logs.get_logger()
    path = Path(file)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror})") from None
    file_sha = sha256_bytes(raw)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(header) or 'none'})"
        )
    reader.fieldnames = header
    rows = list(reader)
    if not rows:
        raise InputError(f"{path}: no rows")
    with db.connect(cfg, autocommit=True) as conn:
        done = conn.execute(
            _sql("select id, rows_imported from {} where file_sha256 = %s", runs.table(cfg, "review_imports")),
            (file_sha,),
        ).fetchone()  # fmt: skip
        if done:
            return {
                "status": "already_imported",
                "import_id": done[0],
                "rows": done[1],
                "file_sha256": file_sha,
            }
        wanted = []
        for r in rows:
            with contextlib.suppress(ValueError):
                wanted.append(int(str(r.get("snapshot_id") or "").strip()))
        existing = {
            row[0]
            for row in conn.execute(
                _sql("select id from {} where id = any(%s)", _app(cfg, "webcam_snapshots")),
                (wanted,),
            )
        }
        # every review item of these snapshots: a row names its cycle and version, or the
        # latest cycle's single item is meant
        items_of: dict[int, list[dict[str, Any]]] = {}
        for sid, cycle, version, reason, old, ai in conn.execute(
            _sql("select snapshot_id, cycle, model_version, reason, label_value, ai_rating"
                 " from {} where snapshot_id = any(%s) order by snapshot_id, cycle desc,"
                 " model_version", runs.table(cfg, "review_items")),
            (wanted,),
        ):  # fmt: skip
            items_of.setdefault(sid, []).append({"cycle": cycle, "model_version": version,
                                                 "reason": reason, "old": old, "ai": ai})  # fmt: skip
    errors: list[str] = []
    accepted: list[dict[str, Any]] = []
    neutralised = 0
    seen: dict[int, int] = {}
    for line, r in enumerate(rows, start=2):
        sid_text = str(r.get("snapshot_id") or "").strip()
        try:
            sid = int(sid_text)
        except ValueError:
            errors.append(f"line {line}: snapshot_id {sid_text[:40]!r} is not a number")
            continue
        if sid in seen:
            errors.append(f"line {line}: snapshot {sid} again (first on line {seen[sid]})")
            continue
        seen[sid] = line
        if sid not in existing:
            errors.append(f"line {line}: snapshot {sid} does not exist")
            continue
        if sid not in items_of:
            errors.append(f"line {line}: snapshot {sid} was in no review set")
            continue
        item, why = _item_for(items_of[sid], r)
        if item is None:
            errors.append(f"line {line}: snapshot {sid} {why}")
            continue
        label_text = str(r.get("label") or "").strip()
        try:
            label = float(label_text)
        except ValueError:
            errors.append(f"line {line}: label {label_text[:40]!r} is not a number")
            continue
        if not (0.0 <= label <= 5.0):
            errors.append(f"line {line}: label {label_text} is outside 0..5")
            continue
        reviewer, n1 = _neutralise(str(r.get("reviewer") or "").strip())
        if not reviewer:
            errors.append(f"line {line}: no reviewer")
            continue
        note, n2 = _neutralise(str(r.get("note") or "").strip())
        neutralised += int(n1) + int(n2)
        accepted.append({"snapshot_id": sid, "label": label, "reviewer": reviewer[:200], "note": note[:1000]}
                        | item)  # fmt: skip
    if errors:
        shown = "; ".join(errors[:20]) + (
            f"; and {len(errors) - 20} more" if len(errors) > 20 else ""
        )
        raise InputError(f"{path}: {len(errors)} bad row(s), nothing imported: {shown}")
    accounting = _accounting(cfg, accepted) | {"neutralised_cells": neutralised}
    with db.job_lock(cfg, "review-import", wait=True), db.connect(cfg) as conn, conn.transaction():
        (import_id,) = conn.execute(
            _sql("insert into {} (file_sha256, file_name, rows_imported, accounting, imported_by)"
                 " values (%s, %s, %s, %s, %s) on conflict (file_sha256) do nothing returning id",
                 runs.table(cfg, "review_imports")),
            (file_sha, path.name, len(accepted), json.dumps(accounting), registry.actor()),
        ).fetchone() or (None,)  # fmt: skip
        if import_id is None:  # a twin imported the same file meanwhile
            return {"status": "already_imported", "file_sha256": file_sha}
        sids = [a["snapshot_id"] for a in accepted]
        conn.execute(
            _sql("update {} set superseded_at = now() where snapshot_id = any(%s)"
                 " and superseded_at is null", runs.table(cfg, "manual_relabels")),
            (sids,),
        )  # fmt: skip
        with conn.cursor() as cur:
            cur.executemany(
                _sql("insert into {} (snapshot_id, label_value, reviewer, reason, review_import_id)"
                     " values (%s, %s, %s, %s, %s)", runs.table(cfg, "manual_relabels")),
                [(a["snapshot_id"], a["label"], a["reviewer"],
                  f"review {a['cycle']} ({a['reason']})" + (f": {a['note']}" if a["note"] else ""),
                  import_id) for a in accepted],
            )  # fmt: skip
    log.info("review_imported", rows=len(accepted), import_id=import_id)
    return {"status": "imported", "import_id": import_id, "rows": len(accepted),
            "file_sha256": file_sha, "accounting": accounting}  # fmt: skip


def _item_for(
    items: list[dict[str, Any]], row: dict[str, Any]
) -> tuple[dict[str, Any] | None, str]:
    """The review item a CSV row answers: the one its cycle and model_version name, else the
    latest cycle's, which must then be one item (not several versions' sets)."""
    cycle = str(row.get("cycle") or "").strip()
    version = str(row.get("model_version") or "").strip()
    found = [it for it in items if (not cycle or it["cycle"] == cycle)
             and (not version or it["model_version"] == version)]  # fmt: skip
    if not found:
        return None, f"was in no review set of cycle {cycle or '-'} / version {version or '-'}"
    latest = [it for it in found if it["cycle"] == found[0]["cycle"]]
    if len(latest) > 1:
        versions = ", ".join(it["model_version"] for it in latest)
        return None, (f"is in the review sets of {versions} in cycle {latest[0]['cycle']}: "
                      "give cycle and model_version")  # fmt: skip
    return latest[0], ""


def _accounting(cfg: Config, accepted: list[dict[str, Any]]) -> dict[str, Any]:
    t = cfg.dataset.good_threshold
    n = len(accepted)
    changed = [a for a in accepted if abs(a["label"] - a["old"]) > 1e-9]
    crossed = [a for a in changed if (a["old"] >= t) != (a["label"] >= t)]
    flagged = [a for a in accepted if a["reason"] == "top_disagreement"]
    label_errors = [a for a in flagged if abs(a["label"] - a["ai"]) < abs(a["old"] - a["ai"])]
    return {
        "reviewed": n,
        "changed": len(changed),
        "yield": len(changed) / n if n else None,
        "crossed_threshold": len(crossed),
        "crossed_share": len(crossed) / n if n else None,
        "flagged_reviewed": len(flagged),
        "flagged_label_errors": len(label_errors),
        "flagged_label_error_rate": len(label_errors) / len(flagged) if flagged else None,
        "by_reason": {
            reason: sum(1 for a in accepted if a["reason"] == reason)
            for reason in sorted({a["reason"] for a in accepted})
        },
    }


# ---- history --------------------------------------------------------------------------------


def history_job(
    cfg: Config, compare: tuple[str, str] | None = None, slices: bool = False
) -> dict[str, Any]:
    """`airatings review history` (module doc)."""
    from jobs import dbt_runner

    with db.connect(cfg, autocommit=True) as conn:
        rows = conn.execute(
            _sql("select e.model_version, e.cycle, e.slice, e.metric, e.value, e.n"
                 " from {} e join {} c on c.cycle = e.cycle and c.model_version = e.model_version"
                 " where e.split = %s and (e.slice = 'all' or %s)"
                 " and e.metric in ('mae', 'roc_auc', 'share_abs_error_gt_1')"
                 " order by c.created_at, e.model_version, e.slice",
                 runs.table(cfg, "model_evaluations"), runs.table(cfg, "review_cycles")),
            (SPLIT, slices),
        ).fetchall()  # fmt: skip
        prod = registry.current(conn, cfg) if _has(conn, cfg, "model_aliases") else None
    table: dict[tuple[str, str, str], dict[str, Any]] = {}
    for version, cycle, slice_name, metric, value, n in rows:
        entry = table.setdefault((cycle, version, slice_name), {"cycle": cycle, "model_version": version,
                                                                "slice": slice_name, "n": n})  # fmt: skip
        entry["disagreement_rate" if metric == "share_abs_error_gt_1" else metric] = value
    lines = list(table.values())
    versions = list(dict.fromkeys(r["model_version"] for r in lines))
    chart = _history_chart(cfg, [r for r in lines if r["slice"] == "all"])
    out: dict[str, Any] = {
        "status": "done",
        "cycles": lines,
        "versions": versions,
        "chart": str(chart),
    }
    pair = compare
    if pair is None and prod is not None:
        # production against the version it replaced, when that one was reviewed too
        with db.connect(cfg, autocommit=True) as conn:
            before = [
                r[0]
                for r in conn.execute(
                    _sql("select from_version from {} where alias = 'production'"
                         " and to_version = %s and from_version is not null order by id desc",
                         runs.table(cfg, "model_alias_history")),
                    (prod,),
                )
            ]  # fmt: skip
        others = [v for v in before if v in versions and v != prod]
        if others:
            pair = (prod, others[0])
    if pair is not None:
        dbt_runner.build(cfg, select=MODELS)
        out["comparison"] = compare_versions(cfg, pair[0], pair[1])
    else:
        out["comparison"] = {"verdict": "no comparison: fewer than two versions reviewed"}
    return out


def _has(conn: psycopg.Connection, cfg: Config, name: str) -> bool:
    return (
        conn.execute("select to_regclass(%s)", (f"{cfg.database.ml_schema}.{name}",)).fetchone()[0]
        is not None
    )


VERDICTS = {
    "better": "improved",
    "worse": "regressed",
    "no detectable difference": "no detectable change",
}


def compare_versions(cfg: Config, new: str, old: str) -> dict[str, Any]:
    """Paired bootstrap of MAE(new) - MAE(old) on the snapshots both scored, the same labels."""
    with db.connect(cfg, autocommit=True) as conn:
        rows = conn.execute(
            _sql("select a.label_value, a.ai_rating, b.ai_rating, a.snapshot_id from {} a join {} b"
                 " on b.snapshot_id = a.snapshot_id and b.model_version = %s"
                 " where a.model_version = %s order by a.snapshot_id",
                 _dbt(cfg, "fct_disagreements"), _dbt(cfg, "fct_disagreements")),
            (old, new),
        ).fetchall()  # fmt: skip
        old_cycle = conn.execute(
            _sql("select data_path, data_sha256 from {} where model_version = %s"
                 " order by created_at desc limit 1", runs.table(cfg, "review_cycles")),
            (old,),
        ).fetchone()  # fmt: skip
    y = np.array([r[0] for r in rows], dtype=np.float64)
    s_new = np.array([r[1] for r in rows], dtype=np.float64)
    s_old = np.array([r[2] for r in rows], dtype=np.float64)
    labels = _label_effect(cfg, old_cycle, [r[3] for r in rows], y, s_old)
    e = cfg.evaluate
    cmp = metrics.comparison(y, s_new, s_old, min_rows=e.min_test_rows, samples=e.bootstrap_samples,
                             level=e.ci_level, seed=e.seed, key=f"history|{new}|{old}")  # fmt: skip
    verdict = VERDICTS.get(cmp.get("verdict", ""), "insufficient data")
    return {"new": new, "old": old, "n": len(y), "verdict": verdict,
            "mae_new": float(np.mean(np.abs(s_new - y))) if len(y) else None,
            "mae_old": float(np.mean(np.abs(s_old - y))) if len(y) else None,
            "mae_diff": cmp.get("mae_diff"), "ci": [cmp.get("ci_low"), cmp.get("ci_high")],
            "labels": labels}  # fmt: skip


def _label_effect(
    cfg: Config, old_cycle: Any, ids: list[int], y_now: np.ndarray, s_old: np.ndarray
) -> dict[str, Any]:
    """How much of a difference comes from corrected labels: the old model's inferences
    against the labels of its last review cycle (frozen then) and against today's, on the
    same snapshots. ``mae_change_from_labels`` < 0: the old model looks better on the
    corrected labels, i.e. some of its "errors" were label errors."""
    if old_cycle is None or not ids:
        return {"status": "no review cycle of the old version to compare labels with"}
    import pyarrow.parquet as pq

    path = runs.verify_recorded(cfg.artifacts_dir / old_cycle[0], old_cycle[1],
                                what="frozen disagreements of the old version",
                                fix="restore it from a backup")  # fmt: skip
    frozen = pq.read_table(path, columns=["snapshot_id", "label_value"]).to_pydict()
    then = dict(zip(frozen["snapshot_id"], frozen["label_value"], strict=True))
    keep = np.array([sid in then for sid in ids])
    if not keep.any():
        return {"status": "no snapshot in common with the old version's last cycle"}
    y_then = np.array([then[sid] for sid in np.asarray(ids)[keep]], dtype=np.float64)
    now, old = y_now[keep], s_old[keep]
    changed = int(np.sum(np.abs(now - y_then) > 1e-9))
    mae_then = float(np.mean(np.abs(old - y_then)))
    mae_now = float(np.mean(np.abs(old - now)))
    return {"n": int(keep.sum()), "labels_changed": changed,
            "old_model_mae_on_cycle_labels": mae_then, "old_model_mae_on_current_labels": mae_now,
            "mae_change_from_labels": mae_now - mae_then}  # fmt: skip


def _history_chart(cfg: Config, rows: list[dict[str, Any]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for version in dict.fromkeys(r["model_version"] for r in rows):
        pts = [r for r in rows if r["model_version"] == version and r.get("mae") is not None]
        if pts:
            ax.plot([r["cycle"] for r in pts], [r["mae"] for r in pts], marker="o", label=version)
    ax.set(xlabel="review cycle", ylabel="MAE (aiRating vs label)")
    if rows:
        ax.legend(fontsize=7)
    fig.autofmt_xdate()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    out = paths.of(cfg).review_history_png
    from jobs.artifacts import atomic_path

    with atomic_path(out) as tmp:
        tmp.write_bytes(buf.getvalue())
    return out
