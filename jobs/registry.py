"""The model registry: registered versions, the ``production`` alias and its history, and the one
way to load a registered model (`airatings models list|show|promote|rollback`).

Tables (``jobs/migrations/0040_model_registry.sql``): ``model_aliases(alias, model_version,
updated_at, updated_by)`` and the append-only ``model_alias_history(alias, action,
from_version, to_version, changed_by, changed_at, reason, forced, comparison)``. An alias can
only point at a registered version (a trigger), and a registered version's row cannot change or
go (another trigger), so what an alias names stays what was registered.

Moving an alias is a compare-and-set in one transaction (:func:`move_alias`): the decision is
made against the production version read first; the update only happens ``where alias =
'production' and model_version is not distinct from <that version>``, with its history row.
Zero rows means someone moved it meanwhile: ``TransientError`` (exit 75), nothing changed; the
retry decides again against the new production (and usually finds its comparison stale).

:func:`promote` moves ``production`` to a version only if

- it is registered and its files verify (:func:`read_verified`), and its ONNX passed the parity
  gate (card and run record): never overridable;
- its evaluation is on record (``params_json['evaluate']``, ``metrics.json`` with the sha256 it
  recorded) with a headline MAE: never overridable (re-run ``airatings evaluate``);
- and, overridable with ``force`` + a non-empty reason (recorded): its paired comparison
  against the *current* production model (``metrics.json['production']``) is not "worse" and
  has enough rows, that comparison was made against the current production version (else it
  is stale: re-run ``airatings evaluate --run V``), and it is not "worse" than the constant
  baseline. With no production yet, the first registered version that passes the rest goes.

:func:`rollback` moves ``production`` back to the version it had before the current one was
promoted (a promotion pushes, a rollback pops: two rollbacks after A, B, C give A), also by
compare-and-set, recorded with its reason.

Who moved it: ``AIR_ACTOR``, else ``USER``, else the login name (:func:`actor`).

Loading: every reader of a registered model goes through :func:`read_verified` (bytes) or
:func:`load_verified` (path): the database row must be ``registered``; ``model_card.json``
must have the sha256 the registration recorded; ``model.onnx`` must have the sha256 both the
card and the row hold; it must hold no external data (a registered model is one file), and
:func:`jobs.onnx_files.load_checked` refuses any external data outside its folder. Any
mismatch refuses (``InputError``, exit 2) naming the file.
"""

from __future__ import annotations

import getpass
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from psycopg import sql

from jobs import db, logs, onnx_files, paths, runs
from jobs.artifacts import sha256_bytes, sha256_file
from jobs.errors import InputError, TransientError

if TYPE_CHECKING:
    import psycopg

    from jobs.config import Config

PRODUCTION = "production"
ALIASES = "model_aliases"
HISTORY = "model_alias_history"
RUNS = "model_training_runs"

# comparison verdicts of jobs.metrics.paired_bootstrap
WORSE = "worse"


def actor() -> str:
    """Who is moving an alias: ``AIR_ACTOR``, ``USER``, else the login name."""
    for var in ("AIR_ACTOR", "USER"):
        value = (os.environ.get(var) or "").strip()
        if value:
            return value[:200]
    try:
        return getpass.getuser()[:200]
    except (OSError, KeyError):  # a container user without a passwd entry
        return f"uid {os.getuid()}"


def clean_reason(reason: str | None) -> str | None:
    """A reason stripped of surrounding blanks; None when nothing is left."""
    if reason is None:
        return None
    reason = " ".join(str(reason).split())
    return reason[:2000] or None


def require_tables(cfg: Config) -> None:
    """InputError (exit 2) naming the fix when migration 0040 is not applied yet."""
    with db.connect(cfg, autocommit=True) as conn:
        _require_registry(conn, cfg)


def _require_registry(conn: psycopg.Connection, cfg: Config) -> None:
    name = sql.Identifier(cfg.database.ml_schema, ALIASES).as_string(conn)
    if conn.execute("select to_regclass(%s)", (name,)).fetchone()[0] is None:
        raise InputError("the model registry tables do not exist yet: run 'airatings migrate'")


def current(conn: psycopg.Connection, cfg: Config, alias: str = PRODUCTION) -> str | None:
    """The version ``alias`` points at, or None."""
    row = conn.execute(
        sql.SQL("select model_version from {} where alias = %s").format(runs.table(cfg, ALIASES)),
        (alias,),
    ).fetchone()
    return None if row is None else str(row[0])


def history(
    conn: psycopg.Connection, cfg: Config, *, alias: str | None = None, version: str | None = None
) -> list[dict[str, Any]]:
    """Alias moves, oldest first: of one alias, or those from or to one version."""
    where, params = [], []
    if alias is not None:
        where.append(sql.SQL("alias = %s"))
        params.append(alias)
    if version is not None:
        where.append(sql.SQL("(from_version = %s or to_version = %s)"))
        params += [version, version]
    q = sql.SQL(
        "select id, alias, action, from_version, to_version, changed_by, changed_at, reason,"
        " forced, comparison from {} {} order by id"
    ).format(
        runs.table(cfg, HISTORY),
        sql.SQL("where ") + sql.SQL(" and ").join(where) if where else sql.SQL(""),
    )
    cols = (
        "id",
        "alias",
        "action",
        "from_version",
        "to_version",
        "changed_by",
        "changed_at",
        "reason",
        "forced",
        "comparison",
    )
    out = []
    for row in conn.execute(q, params):
        item = dict(zip(cols, row, strict=True))
        item["changed_at"] = item["changed_at"].isoformat()
        out.append(item)
    return out


def _artifact(conn: psycopg.Connection, cfg: Config, run_id: int) -> tuple[str | None, str | None]:
    row = conn.execute(
        sql.SQL("select artifact_sha256, artifact_path from {} where id = %s").format(
            runs.table(cfg, RUNS)
        ),
        (run_id,),
    ).fetchone()
    return (row[0], row[1]) if row else (None, None)


# ---- loading a registered model ----------------------------------------------------------------


def read_verified(cfg: Config, version: str) -> tuple[bytes, dict[str, Any]]:
    """``(model.onnx bytes, card)`` of a registered version, checked (module doc): the bytes
    returned are the ones hashed, so a scorer that builds its session from them cannot load a
    file swapped after the check. InputError (exit 2) on any mismatch."""

    with db.connect(cfg, autocommit=True) as conn:
        _require_registry(conn, cfg)
        run = runs.get_run(conn, cfg, version)
        db_sha, rel_path = _artifact(conn, cfg, run.id)
    v = run.model_version
    if run.status != "registered" or not db_sha:
        raise InputError(
            f"model version {v} is not registered (status '{run.status}'); "
            f"run 'airatings register --run {v}'"
        )
    rec = run.params.get("register") or {}
    model_paths = paths.of(cfg).model(v)
    expected_rel = str(model_paths.onnx.relative_to(cfg.artifacts_dir))
    if rel_path != expected_rel:
        raise InputError(f"{v}: the database records its model at {rel_path}, not {expected_rel}")
    try:
        card_bytes = model_paths.card.read_bytes()
        data = model_paths.onnx.read_bytes()
    except FileNotFoundError as exc:
        raise InputError(
            f"{v} is registered but {exc.filename} is missing; restore it from a backup of "
            f"{model_paths.root} (sha256 recorded in the database)"
        ) from None
    card_sha = sha256_bytes(card_bytes)
    if card_sha != rec.get("card_sha256"):
        raise InputError(
            f"{model_paths.card}: sha256 {card_sha} does not match the recorded "
            f"{rec.get('card_sha256')}; refusing to load {v}"
        )
    card = json.loads(card_bytes)
    if card.get("model_version") != v or card.get("sha256") != db_sha:
        raise InputError(f"{model_paths.card} does not describe the registered {v}; refusing")
    actual = sha256_bytes(data)
    if actual != db_sha:
        raise InputError(
            f"{model_paths.onnx}: sha256 {actual} does not match the registered {db_sha} "
            f"(model card and database); refusing to load {v}"
        )
    onnx_files.self_contained(data, model_paths.onnx)
    return data, card


def load_verified(cfg: Config, version: str) -> tuple[Path, dict[str, Any]]:
    """``(path to model.onnx, card)`` of a registered version, checked like
    :func:`read_verified`, and the file at ``path`` checked again by
    :func:`jobs.onnx_files.load_checked` (its sha256, no external data outside its folder)
    right before it is handed out. Prefer :func:`read_verified` when you can load bytes."""

    _, card = read_verified(cfg, version)
    path = paths.of(cfg).model(card["model_version"]).onnx
    onnx_files.load_checked(path, expected_sha256=card["sha256"])
    return path, card


# ---- moving an alias -------------------------------------------------------------------------


def move_alias(
    cfg: Config,
    alias: str,
    *,
    expected: str | None,
    to_version: str,
    action: str,
    reason: str | None,
    forced: bool,
    comparison: dict[str, Any] | None,
    changed_by: str | None = None,
) -> dict[str, Any]:
    """Compare-and-set ``alias`` from ``expected`` (None: not set yet) to ``to_version`` and
    write its history row, in one transaction. TransientError (exit 75) when the alias is not
    at ``expected`` any more: nothing changed."""
    import psycopg

    who = changed_by or actor()
    aliases, hist = runs.table(cfg, ALIASES), runs.table(cfg, HISTORY)
    with db.connect(cfg) as conn:
        try:
            with conn.transaction():
                if expected is None:
                    cur = conn.execute(
                        sql.SQL(
                            "insert into {} (alias, model_version, updated_by) values (%s, %s, %s)"
                            " on conflict (alias) do nothing"
                        ).format(aliases),
                        (alias, to_version, who),
                    )
                else:
                    cur = conn.execute(
                        sql.SQL(
                            "update {} set model_version = %s, updated_at = now(), updated_by = %s"
                            " where alias = %s and model_version is not distinct from %s"
                        ).format(aliases),
                        (to_version, who, alias, expected),
                    )
                if cur.rowcount != 1:
                    now = current(conn, cfg, alias)
                    raise TransientError(
                        f"'{alias}' moved while this {action} was decided: it was "
                        f"{expected or 'not set'}, it is now {now or 'not set'}; nothing changed. "
                        f"Safe to re-run: the decision is made again against {now or 'none'}"
                    )
                row = conn.execute(
                    sql.SQL(
                        "insert into {} (alias, action, from_version, to_version, changed_by,"
                        " reason, forced, comparison) values (%s, %s, %s, %s, %s, %s, %s, %s)"
                        " returning id, changed_at"
                    ).format(hist),
                    (
                        alias,
                        action,
                        expected,
                        to_version,
                        who,
                        reason,
                        forced,
                        None if comparison is None else json.dumps(comparison, default=str),
                    ),
                ).fetchone()
        except psycopg.errors.CheckViolation as exc:  # the trigger: not a registered version
            raise InputError(exc.diag.message_primary or str(exc)) from None
    logs.get_logger().info(
        "alias_moved",
        alias=alias,
        action=action,
        from_version=expected,
        to_version=to_version,
        changed_by=who,
        forced=forced,
    )
    return {
        "alias": alias,
        "action": action,
        "from_version": expected,
        "to_version": to_version,
        "changed_by": who,
        "changed_at": row[1].isoformat(),
        "history_id": row[0],
        "reason": reason,
        "forced": forced,
    }


# ---- promotion -------------------------------------------------------------------------------


def _verified_metrics(cfg: Config, run: runs.Run) -> dict[str, Any]:
    """The run's metrics.json, checked against the sha256 evaluate recorded (hard refusal)."""
    v = run.model_version
    rec = run.params.get("evaluate") or {}
    path = paths.of(cfg).run(v).metrics
    if not rec.get("metrics_sha256"):
        raise InputError(
            f"{v} has no evaluation on record; run 'airatings evaluate --run {v}' first"
        )
    if not path.is_file() or sha256_file(path) != rec["metrics_sha256"]:
        raise InputError(
            f"{path} is missing or not the file evaluate recorded; re-run "
            f"'airatings evaluate --run {v}'"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def _comparison_text(cmp: dict[str, Any]) -> str:
    if "mae_diff" not in cmp:
        return f"insufficient data ({cmp.get('n')} rows)"
    return (
        f"{cmp.get('verdict')}: MAE {cmp['mae_model']:.4f} vs {cmp['mae_other']:.4f}, "
        f"difference {cmp['mae_diff']:+.4f} (CI {cmp.get('ci_low')}, {cmp.get('ci_high')}; "
        f"n={cmp.get('n')})"
    )


def assess(cfg: Config, run: runs.Run, production: str | None) -> dict[str, Any]:
    """Whether ``run`` may replace ``production``: ``{"ok", "problems", "comparison"}``.
    Raises InputError for what no force overrides (no verifiable evaluation, no headline)."""
    v = run.model_version
    result = _verified_metrics(cfg, run)
    mae = ((result.get("metrics") or {}).get("all") or {}).get("mae") or {}
    if mae.get("status") != "ok":
        raise InputError(
            f"the evaluation of {v} has no headline MAE (insufficient test data); a version "
            f"whose evaluation gave no result cannot be promoted"
        )
    problems: list[str] = []
    compared = result.get("production") or {}
    compared_to = compared.get("model_version")
    comparison: dict[str, Any] = {
        "against": production,
        "evaluated_against": compared_to,
        "mae": mae.get("value"),
        "mae_ci": [mae.get("ci_low"), mae.get("ci_high")],
        "metrics_sha256": (run.params.get("evaluate") or {}).get("metrics_sha256"),
    }
    constant = (result.get("baselines") or {}).get("constant") or {}
    comparison["vs_constant"] = {
        k: constant.get(k) for k in ("verdict", "mae_diff", "ci_low", "ci_high", "n")
    }
    if constant.get("verdict") == WORSE:
        problems.append(f"it is worse than the constant baseline ({_comparison_text(constant)})")
    if production is None:
        comparison["note"] = "no production model yet"
    elif compared_to != production:
        problems.append(
            f"its evaluation compared it with {compared_to or 'no production model'}, but "
            f"production is now {production} (stale comparison): re-run "
            f"'airatings evaluate --run {v}'"
        )
    else:
        comparison["paired"] = {
            k: compared.get(k)
            for k in ("verdict", "mae_model", "mae_other", "mae_diff", "ci_low", "ci_high", "n")
        }
        if "verdict" not in compared:
            problems.append(
                f"its paired comparison with {production} has too little data "
                f"({compared.get('n')} rows)"
            )
        elif compared["verdict"] == WORSE:
            problems.append(
                f"its paired comparison with production {production} is "
                f"{_comparison_text(compared)}"
            )
    return {"ok": not problems, "problems": problems, "comparison": comparison}


def _registered_run(cfg: Config, version: str) -> tuple[runs.Run, dict[str, Any]]:
    """The run of a registered, verified version that passed parity (never overridable)."""
    with db.connect(cfg, autocommit=True) as conn:
        _require_registry(conn, cfg)
        run = runs.get_run(conn, cfg, version)
    _, card = read_verified(cfg, run.model_version)
    parity_ok = (card.get("parity") or {}).get("passed") is True and (
        ((run.params.get("onnx") or {}).get("parity") or {}).get("passed") is True
    )
    if not parity_ok:
        raise InputError(f"{run.model_version} did not pass the ONNX parity gate; not promotable")
    return run, card


def promote(
    cfg: Config, version: str, force: bool = False, reason: str | None = None
) -> dict[str, Any]:
    """Move ``production`` to ``version`` if it may go there (module doc); ``force`` (with a
    reason) overrides the comparison gates only. Returns the summary."""
    reason = clean_reason(reason)
    if force and not reason:
        raise InputError("--force needs --reason TEXT: why this version goes to production")
    run, card = _registered_run(cfg, version)
    v = run.model_version
    with db.connect(cfg, autocommit=True) as conn:
        production = current(conn, cfg)
    if production == v:
        return {
            "status": "already_production",
            "model_version": v,
            "alias": PRODUCTION,
            "reason": f"{v} is production already; nothing changed",
        }
    decision = assess(cfg, run, production)
    comparison = decision["comparison"] | {
        "gate": "passed" if decision["ok"] else "overridden",
        "problems": decision["problems"],
    }
    if not decision["ok"] and not force:
        raise InputError(
            f"refusing to promote {v} over {production or 'nothing'}: "
            + "; ".join(decision["problems"])
            + ". To promote anyway: --force --reason TEXT (recorded)"
        )
    moved = move_alias(
        cfg,
        PRODUCTION,
        expected=production,
        to_version=v,
        action="promote",
        reason=reason,
        forced=bool(force and not decision["ok"]),
        comparison=comparison,
    )
    return {
        "status": "promoted",
        "model_version": v,
        "previous": production,
        "sha256": card["sha256"],
        "comparison": comparison,
        **{k: moved[k] for k in ("alias", "changed_by", "changed_at", "reason", "forced")},
    }


def production_stack(rows: list[dict[str, Any]]) -> list[str]:
    """The versions production went through, as a stack: a promotion pushes, a rollback pops
    (``rows``: its history, oldest first). The top is the current version."""
    stack: list[str] = []
    for row in rows:
        if row["action"] == "rollback":
            if stack and stack[-1] == row["from_version"]:
                stack.pop()
            if not stack or stack[-1] != row["to_version"]:
                stack.append(row["to_version"])
        else:
            stack.append(row["to_version"])
    return stack


def rollback(cfg: Config, reason: str | None = None) -> dict[str, Any]:
    """Move ``production`` back to the version before the current one (compare-and-set,
    recorded). The target's files are verified first."""
    reason = clean_reason(reason)
    with db.connect(cfg, autocommit=True) as conn:
        _require_registry(conn, cfg)
        production = current(conn, cfg)
        rows = history(conn, cfg, alias=PRODUCTION)
    if production is None:
        raise InputError("there is no production model: nothing to roll back")
    stack = production_stack(rows)
    if not stack or stack[-1] != production:
        raise InputError(
            f"production is {production}, but its history ends at "
            f"{stack[-1] if stack else 'nothing'}; promote a version explicitly"
        )
    if len(stack) < 2:
        raise InputError(f"production {production} was the first production model: no previous")
    target = stack[-2]
    read_verified(cfg, target)  # never roll back onto a tampered model
    moved = move_alias(
        cfg,
        PRODUCTION,
        expected=production,
        to_version=target,
        action="rollback",
        reason=reason,
        forced=False,
        comparison={"rolled_back_from": production},
    )
    return {
        "status": "rolled_back",
        "model_version": target,
        "previous": production,
        **{k: moved[k] for k in ("alias", "changed_by", "changed_at", "reason")},
    }


# ---- reading -----------------------------------------------------------------------------------


def list_models(cfg: Config) -> dict[str, Any]:
    """Every run: version, status, registered or not, its aliases, its headline metrics."""
    with db.connect(cfg, autocommit=True) as conn:
        _require_registry(conn, cfg)
        rows = conn.execute(
            sql.SQL(
                "select r.id, r.model_version, r.status, r.dataset_hash, r.created_at,"
                " r.artifact_sha256, r.artifact_path, r.params_json -> 'register' -> 'metrics',"
                " r.failure_reason, r.notes,"
                " coalesce(array_agg(a.alias order by a.alias) filter (where a.alias is not null),"
                " '{{}}')"
                " from {} as r left join {} as a on a.model_version = r.model_version"
                " group by r.id order by r.id"
            ).format(runs.table(cfg, RUNS), runs.table(cfg, ALIASES))
        ).fetchall()
        production = current(conn, cfg)
    models = [
        {
            "id": r[0],
            "model_version": r[1],
            "status": r[2],
            "registered": r[2] == "registered",
            "aliases": list(r[10]),
            "dataset_hash": r[3],
            "created_at": r[4].isoformat(),
            "sha256": r[5],
            "artifact_path": r[6],
            "metrics": r[7],
            "failure_reason": r[8],
            "notes": r[9],
        }
        for r in rows
    ]
    return {
        "status": "done",
        "count": len(models),
        "registered": sum(m["registered"] for m in models),
        "production": production,
        "models": models,
    }


def show(cfg: Config, version: str) -> dict[str, Any]:
    """One version: its run record, its card (verified, or why not) and its alias history."""
    with db.connect(cfg, autocommit=True) as conn:
        _require_registry(conn, cfg)
        run = runs.get_run(conn, cfg, version)
        v = run.model_version
        sha, rel = _artifact(conn, cfg, run.id)
        aliases = [
            r[0]
            for r in conn.execute(
                sql.SQL("select alias from {} where model_version = %s order by alias").format(
                    runs.table(cfg, ALIASES)
                ),
                (v,),
            )
        ]
        moves = history(conn, cfg, version=v)
    out: dict[str, Any] = {
        "status": "done",
        "model_version": v,
        "run_id": run.id,
        "run_status": run.status,
        "registered": run.status == "registered",
        "aliases": aliases,
        "sha256": sha,
        "artifact_path": rel,
        "history": moves,
    }
    if run.status == "registered":
        try:
            _, out["card"] = read_verified(cfg, v)
            out["integrity"] = "verified"
        except InputError as exc:
            out["integrity"] = f"FAILED: {exc}"
    else:
        out["integrity"] = "not registered"
    return out
