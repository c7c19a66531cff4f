"""`airatings register [--run REF] [--promote [--force --reason TEXT]]`: an exported run becomes an
immutable model version the app can run, optionally promoted to ``production``.

For a run at ``onnx_exported`` whose parity gate passed, into ``models/<version>/``
(:mod:`jobs.paths`), each file write-once (:func:`jobs.artifacts.write_once`: written under a
temp name and hard-linked into place, so of two writers exactly one creates it; the same bytes
again are fine, other bytes are refused, exit 2) and made read-only:

- ``model.onnx``: the run's export, its sha256 checked against the one export-onnx recorded
  before the copy and the copy checked again after it; one self-contained file (no external
  data);
- ``model_card.json``: everything the app and a reviewer need (:func:`build_card`): version,
  sha256, input/output spec, preprocessing, calibration knots, threshold policy, training run,
  dataset hash, labels used and excluded, test metrics with CIs, parity results, library
  versions. It is a pure function of recorded inputs (no clock), so a re-run after a kill
  writes the same bytes;
- ``release.env`` (``AI_MODEL_VERSION``, ``AI_MODEL_PATH``, ``AI_MODEL_SHA256``,
  ``AI_MODEL_CARD_PATH``, ``AI_CAPTURE_THRESHOLD``; paths relative to the artifact store's
  root) and ``configmap.yaml``, a Kubernetes ConfigMap ``airatings-model`` with the same keys.

Then, in one transaction with the run row locked and the job's advisory lock re-checked, the
run gets ``artifact_sha256``, ``artifact_path``, ``params_json['register']`` (files and their
sha256s, a metrics summary, who and when) and status ``registered``. From then on the database
refuses to change what identifies it (migration 0040's trigger).

Killed before that commit, files may be at their final names but nothing registers them; the
re-run writes the same bytes (accepted) and commits. If the export was redone meanwhile the
bytes differ and the re-run refuses, naming the unregistered folder to remove.

A registered run: ``already_registered`` (exit 0) when its files verify
(:func:`jobs.registry.read_verified`) and the run's own ``model.onnx``, if still there, is the
same bytes; other bytes under the same version are refused (exit 2).

``--promote`` then calls :func:`jobs.registry.promote` (its gates, ``--force`` with a reason);
a refused promotion is exit 2 saying the version is registered but not promoted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from psycopg import sql

from jobs import db, logs, onnx_files, paths, registry, runs
from jobs.artifacts import sha256_bytes, sha256_file, sweep_temp, verify_sha256, write_once
from jobs.errors import InputError

if TYPE_CHECKING:
    import psycopg

    from jobs.config import Config

CARD_FORMAT = 1
CONFIGMAP_NAME = "airatings-model"
# what the app's scorer returns per image (docs/contracts.md), and where each value comes from
SCORER_INTERFACE = {
    "rawScore": "the graph's output raw_score",
    "aiRating": "the calibration knots applied to rawScore (0..5)",
    "modelVersion": "model_version",
}


def run(
    cfg: Config,
    run_ref: str | int = "latest",
    promote: bool = False,
    force: bool = False,
    reason: str | None = None,
) -> dict[str, Any]:
    """Register ``run_ref`` (an id, a model version or "latest"); with ``promote``, then promote it.
    Returns the summary (also recorded in ``params_json['register']``)."""
    log = logs.get_logger()
    started = time.monotonic()
    reason = registry.clean_reason(reason)
    if force and not promote:
        raise InputError("--force only applies to --promote")
    if force and not reason:
        raise InputError("--force needs --reason TEXT: why this version goes to production")
    registry.require_tables(cfg)
    with runs.claim(cfg, "register", run_ref) as (run, skipped):
        if skipped:
            if promote:
                skipped["reason"] += "; not promoted either: re-run with --promote once it is done"
            return skipped
        model_paths = paths.of(cfg).model(run.model_version)
        sweep_temp(model_paths.root, recursive=False)
        if run.status == "registered":
            summary = already_registered(cfg, run)
            log.info("register_already_done", model_dir=str(model_paths.root))
        else:
            runs.require(run, "onnx_exported")
            summary = _register(cfg, run)
    if promote:
        try:
            summary["promotion"] = registry.promote(
                cfg, run.model_version, force=force, reason=reason
            )
        except InputError as exc:
            raise InputError(
                f"{run.model_version} is registered ({summary['status']}) but was not "
                f"promoted: {exc}"
            ) from None
    summary["seconds"] = round(time.monotonic() - started, 3)
    return summary


# ---- already registered ----------------------------------------------------------------------


def already_registered(cfg: Config, run: runs.Run) -> dict[str, Any]:
    """The registered files verify and the run's export is the same bytes; else InputError."""
    v = run.model_version
    _, card = registry.read_verified(cfg, v)
    rec = run.params.get("register") or {}
    model_paths = paths.of(cfg).model(v)
    for name, path in (
        ("release_env", model_paths.release_env),
        ("configmap", model_paths.configmap),
    ):
        expected = (rec.get("files") or {}).get(name, {}).get("sha256")
        if not path.is_file() or sha256_file(path) != expected:
            raise InputError(
                f"{v} is registered but {path} is missing or changed (recorded sha256 {expected}); "
                f"restore it from a backup of {model_paths.root}"
            )
    exported = paths.of(cfg).run(v).onnx
    if exported.is_file() and sha256_file(exported) != card["sha256"]:
        raise InputError(
            f"{exported} is not the model registered as {v} (sha256 {card['sha256']}): a "
            f"registered version is immutable; export a new run for a new model"
        )
    return _summary("already_registered", cfg, v, rec)


# ---- registering -----------------------------------------------------------------------------


def _register(cfg: Config, run: runs.Run) -> dict[str, Any]:
    log = logs.get_logger()
    v = run.model_version
    run_paths = paths.of(cfg).run(v)
    model_paths = paths.of(cfg).model(v)
    onnx_rec = run.params.get("onnx") or {}
    onnx_sha = onnx_rec.get("onnx_sha256")
    if not onnx_sha or not onnx_rec.get("parity_sha256"):
        raise InputError(
            f"run {v} has no export record (params_json['onnx']); run "
            f"'airatings export-onnx --run {v}'"
        )
    if (onnx_rec.get("parity") or {}).get("passed") is not True:
        raise InputError(f"run {v} did not pass the ONNX parity gate: nothing is registered")
    parity_doc = _verified_json(run_paths.parity, onnx_rec["parity_sha256"], v, "export-onnx")
    if (parity_doc.get("parity") or {}).get("passed") is not True:
        raise InputError(f"{run_paths.parity} says the parity gate failed: nothing is registered")
    threshold = float(onnx_rec.get("good_threshold", cfg.dataset.good_threshold))
    if threshold != cfg.dataset.good_threshold:
        raise InputError(
            f"export-onnx checked the capture gate at {threshold:g}, the config says "
            f"dataset.good_threshold={cfg.dataset.good_threshold:g}; re-run "
            f"'airatings export-onnx --run {v}' with this config"
        )

    data = _verified_model_bytes(run_paths.onnx, onnx_sha, v)
    eval_rec = run.params.get("evaluate") or {}
    if not eval_rec.get("metrics_sha256"):
        raise InputError(f"run {v} has no evaluation on record; run 'airatings evaluate --run {v}'")
    result = _verified_json(run_paths.metrics, eval_rec["metrics_sha256"], v, "evaluate")

    with db.connect(cfg, autocommit=True) as conn:
        labels = label_counts(conn, cfg, run)
        trained_at = conn.execute(
            sql.SQL("select trained_at from {} where id = %s").format(
                runs.table(cfg, "model_training_runs")
            ),
            (run.id,),
        ).fetchone()[0]
    card = build_card(cfg, run, onnx_rec, result, labels, trained_at, len(data), threshold)
    card_bytes = (json.dumps(card, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
    env_bytes = release_env(cfg, v, onnx_sha, threshold).encode()
    configmap_bytes = configmap(cfg, v, onnx_sha, threshold).encode()

    # A lost lock (docs/faults.md 27): a twin may be registering too; write nothing.
    db.check_locks()
    files = {
        "onnx": (model_paths.onnx, data),
        "card": (model_paths.card, card_bytes),
        "release_env": (model_paths.release_env, env_bytes),
        "configmap": (model_paths.configmap, configmap_bytes),
    }
    for path, content in files.values():
        _write_once(path, content, v, model_paths.root)
    verify_sha256(model_paths.onnx, onnx_sha)  # the copy at its final name, read back
    log.info("model_files_written", model_dir=str(model_paths.root), sha256=onnx_sha)

    rel = {name: _rel(cfg, path) for name, (path, _) in files.items()}
    record = {
        "status": "registered",
        "model_version": v,
        "artifact_path": rel["onnx"],
        "artifact_sha256": onnx_sha,
        "onnx_bytes": len(data),
        "card_path": rel["card"],
        "card_sha256": sha256_bytes(card_bytes),
        "files": {
            name: {"path": rel[name], "sha256": sha256_bytes(content)}
            for name, (_, content) in files.items()
        },
        "parity_passed": True,
        "good_threshold": threshold,
        "metrics": metrics_summary(result),
        "metrics_sha256": eval_rec["metrics_sha256"],
        "labels": {k: labels[k] for k in ("used", "excluded", "offered")},
        "registered_at": dt.datetime.now(dt.UTC).isoformat(),
        "registered_by": registry.actor(),
    }
    with db.connect(cfg) as conn, conn.transaction():
        status, sha_now = conn.execute(
            sql.SQL(
                "select status, params_json -> 'onnx' ->> 'onnx_sha256' from {}"
                " where id = %s for update"
            ).format(runs.table(cfg, "model_training_runs")),
            (run.id,),
        ).fetchone()
        if status != "onnx_exported" or sha_now != onnx_sha:
            raise InputError(
                f"run {v} changed while it was registered (now '{status}', export sha256 "
                f"{sha_now}); nothing was recorded, re-run 'airatings register --run {v}'"
            )
        runs.set_status(
            conn,
            cfg,
            run.id,
            "registered",
            step="register",
            summary=record,
            artifact_sha256=onnx_sha,
            artifact_path=rel["onnx"],
        )
    log.info(
        "model_registered",
        model_dir=str(model_paths.root),
        sha256=onnx_sha,
        mae=record["metrics"].get("mae"),
    )
    return _summary("registered", cfg, v, record)


def _summary(status: str, cfg: Config, v: str, record: dict[str, Any]) -> dict[str, Any]:
    model_paths = paths.of(cfg).model(v)
    return {
        "status": status,
        "model_version": v,
        "sha256": record.get("artifact_sha256"),
        "model_dir": str(model_paths.root),
        "onnx": str(model_paths.onnx),
        "card": str(model_paths.card),
        "release_env": str(model_paths.release_env),
        "configmap": str(model_paths.configmap),
        "good_threshold": record.get("good_threshold"),
        "metrics": record.get("metrics"),
        "labels": record.get("labels"),
    }


def _rel(cfg: Config, path: Path) -> str:
    return str(path.relative_to(cfg.artifacts_dir))


def _verified_json(path: Path, expected: str, v: str, step: str) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"{path} is missing; re-run 'airatings {step} --run {v}'")
    data = path.read_bytes()
    if sha256_bytes(data) != expected:
        raise InputError(
            f"{path} is not the file {step} recorded (sha256 {expected}); re-run "
            f"'airatings {step} --run {v}'"
        )
    return json.loads(data)


def _verified_model_bytes(path: Path, expected: str, v: str) -> bytes:
    """The run's model.onnx: the recorded bytes, a readable ONNX model, one file."""
    import onnx

    if not path.is_file():
        raise InputError(f"{path} is missing; re-run 'airatings export-onnx --run {v}'")
    data = path.read_bytes()
    actual = sha256_bytes(data)
    if actual != expected:
        raise InputError(
            f"{path}: sha256 {actual} is not the {expected} export-onnx recorded; refusing to "
            f"register it (re-run 'airatings export-onnx --run {v}')"
        )
    model = onnx_files.self_contained(data, path)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise InputError(f"{path}: not a valid ONNX model ({exc})") from None
    return data


def _write_once(path: Path, content: bytes, v: str, folder: Path) -> None:
    try:
        write_once(path, content)
    except InputError:
        raise InputError(
            f"{path} already exists with other bytes, and the database does not register {v}: "
            f"a registration killed before its commit left {folder}, and what would be "
            f"registered now differs (the export or evaluation was redone since). Nothing "
            f"loads an unregistered folder: remove {folder} and re-run 'airatings register "
            f"--run {v}'"
        ) from None
    with contextlib.suppress(OSError):
        os.chmod(path, 0o444)  # a reminder on disk; the sha256 checks are the guarantee


# ---- what goes into the card ----------------------------------------------------------------


def label_counts(conn: psycopg.Connection, cfg: Config, run: runs.Run) -> dict[str, Any]:
    """Labels the run was offered, used and excluded (by reason), from the provenance rows;
    checked against what the cache step recorded (``params_json['cache']['labels']``)."""
    rows = conn.execute(
        sql.SQL(
            "select used_in_training, exclusion_reason, count(*) from {}"
            " where training_run_id = %s group by 1, 2 order by 1, 2"
        ).format(runs.table(cfg, "model_training_snapshot_labels")),
        (run.id,),
    ).fetchall()
    used = sum(n for u, _, n in rows if u is True)
    excluded = sum(n for u, _, n in rows if u is False)
    counts = {
        "offered": sum(n for _, _, n in rows),
        "used": used,
        "excluded": excluded,
        "not_recorded": sum(n for u, _, n in rows if u is None),
        "excluded_by_reason": {r: n for u, r, n in rows if u is False},
    }
    recorded = (run.params.get("cache") or {}).get("labels")
    if recorded and any(recorded.get(k) != counts[k] for k in ("used", "excluded", "offered")):
        raise InputError(
            f"run {run.model_version}: the cache step recorded labels {recorded}, the "
            f"provenance rows say {counts}; re-run 'airatings cache --run {run.model_version}'"
        )
    return counts


def metrics_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers the run row keeps (the card has them all)."""
    allm = (result.get("metrics") or {}).get("all") or {}
    gate = (result.get("capture_gate") or {}).get("metrics") or {}

    def value(name: str) -> Any:
        m = allm.get(name) or {}
        return m.get("value") if m.get("status") == "ok" else "insufficient_data"

    prod = result.get("production") or {}
    return {
        "split": result.get("split"),
        "n": result.get("n"),
        **{k: value(k) for k in ("mae", "rmse", "spearman", "roc_auc")},
        # the capture gate on the calibrated aiRating (what the app's cron applies)
        **{
            f"gate_{k}": (gate.get(k) or {}).get("value")
            if (gate.get(k) or {}).get("status") == "ok"
            else "insufficient_data"
            for k in ("precision", "recall")
        },
        "mae_ci": [(allm.get("mae") or {}).get("ci_low"), (allm.get("mae") or {}).get("ci_high")],
        "vs_constant": ((result.get("baselines") or {}).get("constant") or {}).get(
            "verdict", "insufficient_data"
        ),
        "vs_production": {
            "model_version": prod.get("model_version"),
            "verdict": prod.get("verdict") or prod.get("note"),
        },
    }


def build_card(
    cfg: Config,
    run: runs.Run,
    onnx_rec: dict[str, Any],
    result: dict[str, Any],
    labels: dict[str, Any],
    trained_at: dt.datetime | None,
    size: int,
    threshold: float,
) -> dict[str, Any]:
    """model_card.json: a pure function of the recorded inputs (docs/architecture.md's contract)."""
    v = run.model_version
    train_rec = run.params.get("train") or {}
    export_rec = run.params.get("export") or {}
    io = onnx_rec.get("io") or {}
    gate = result.get("capture_gate") or {}
    gate_metrics = gate.get("metrics") or {}
    return {
        "card_format": CARD_FORMAT,
        "model_version": v,
        "file": "model.onnx",
        "sha256": onnx_rec["onnx_sha256"],
        "bytes": size,
        "format": {
            "type": "onnx",
            "opset": onnx_rec.get("opset"),
            "exporter": onnx_rec.get("exporter"),
        },
        "inputs": io.get("inputs"),
        "outputs": io.get("outputs"),
        "target": onnx_rec.get("target"),
        "raw_score": onnx_rec.get("raw_score"),
        "preprocessing": onnx_rec.get("preprocessing"),
        "calibration": onnx_rec.get("calibration"),
        "threshold_policy": {
            "gate": "capture",
            "rule": "aiRating >= threshold",
            "threshold": threshold,
            "source": "dataset.good_threshold",
            # the gate as the app applies it: on the calibrated aiRating, test split, with CIs
            "test_split_at_threshold": {
                k: gate_metrics.get(k) for k in ("precision", "recall", "f1", "mae")
            },
            "test_pass_rate": gate.get("pass_rate"),
            "test_confusion_matrix": gate.get("confusion_matrix"),
            "score_mapping": onnx_rec.get("score_mapping"),
        },
        "scorer_interface": SCORER_INTERFACE,
        "training_run": {
            "id": run.id,
            "model_version": v,
            "trained_at": trained_at.isoformat() if trained_at else None,
            "config_hash": run.config_hash,
            "checkpoint_sha256": onnx_rec.get("checkpoint_sha256"),
            "spec": train_rec.get("spec"),
            "best_epoch": train_rec.get("best_epoch"),
            "metric": train_rec.get("metric"),
            "best_metric": train_rec.get("best_metric"),
            "weights": train_rec.get("weights"),
            "train_rows": train_rec.get("train_rows"),
            "val_rows": train_rec.get("val_rows"),
        },
        "dataset": {
            "hash": run.dataset_hash,
            "counts": export_rec.get("counts"),
        },
        "labels": labels,
        "metrics": {
            "split": result.get("split"),
            "n": result.get("n"),
            "good_threshold": result.get("good_threshold"),
            "bootstrap": result.get("bootstrap"),
            "slices": result.get("metrics"),
            "confusion_matrix": result.get("confusion_matrix"),
            "capture_gate": gate,
            "calibration_before": result.get("calibration"),
            "calibration_after": result.get("calibration_after"),
            "baselines": result.get("baselines"),
            "production": result.get("production"),
            "metrics_sha256": (run.params.get("evaluate") or {}).get("metrics_sha256"),
        },
        "parity": onnx_rec.get("parity"),
        "original_vs_training_copy": onnx_rec.get("original_vs_training_copy"),
        "libraries": {
            "training": train_rec.get("library_versions"),
            "export": onnx_rec.get("libraries"),
        },
    }


# ---- runtime config for the app -------------------------------------------------------------


def runtime_values(cfg: Config, v: str, sha: str, threshold: float) -> dict[str, str]:
    """The app's settings for this version; paths relative to the artifact store root."""
    model_paths = paths.of(cfg).model(v)
    return {
        "AI_MODEL_VERSION": v,
        "AI_MODEL_PATH": _rel(cfg, model_paths.onnx),
        "AI_MODEL_SHA256": sha,
        "AI_MODEL_CARD_PATH": _rel(cfg, model_paths.card),
        "AI_CAPTURE_THRESHOLD": repr(float(threshold)),
    }


def release_env(cfg: Config, v: str, sha: str, threshold: float) -> str:
    """``KEY=value`` lines (values are plain tokens: a version matches ``[a-z0-9_]+``)."""
    lines = [
        f"# airatings model {v}: paths are relative to the artifact store root",
        *(f"{k}={val}" for k, val in runtime_values(cfg, v, sha, threshold).items()),
    ]
    return "\n".join(lines) + "\n"


def configmap(cfg: Config, v: str, sha: str, threshold: float) -> str:
    """A Kubernetes ConfigMap (v1) with the same keys as release.env, every value a string."""
    doc = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": CONFIGMAP_NAME,
            "labels": {
                "app.kubernetes.io/name": "airatings",
                "app.kubernetes.io/component": "model",
                "app.kubernetes.io/part-of": "ai-ratings",
                "app.kubernetes.io/managed-by": "airatings",
            },
            # a version can be longer than a label value may be (63 characters)
            "annotations": {"airatings/model-version": v, "airatings/model-sha256": sha},
        },
        "data": runtime_values(cfg, v, sha, threshold),
    }
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
