"""`airatings`: one subcommand per lifecycle job. This module only wires subcommands.

Each subcommand parses options, loads the config (exit 2 on any config problem, before any
write), binds log context and calls a plain function ``run(cfg, ...) -> summary dict`` in the
job's module. ``--json`` prints that summary as one JSON object on stdout; otherwise a short
human summary. Exit codes: 0 done / already done, 2 bad config or input, 75 transient.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from jobs.errors import EXIT_TRANSIENT, JobError, Terminated

# Arrow's C++ allocator is chosen once, when pyarrow first allocates, from this variable: the
# jobs run on jemalloc, which returns freed pages to the OS; the default (mimalloc) kept them,
# and the cache job's peak memory grew with the rows (BENCHMARKS.md "Scale"). A value already
# set wins; jemalloc is in pyarrow's Linux wheels only.
if sys.platform == "linux":
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")

app = typer.Typer(
    help="ai-ratings: people's ratings of webcam snapshots -> a better ONNX model, reproducibly.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
db_app = typer.Typer(
    help="Manage the embedded PostgreSQL (or show the DATABASE_URL in use).", no_args_is_help=True
)
demo_app = typer.Typer(help="The synthetic demo world.", no_args_is_help=True)
app.add_typer(db_app, name="db")
weights_app = typer.Typer(help="Pretrained backbone weights.", no_args_is_help=True)
models_app = typer.Typer(
    help="Model versions: list, show, promote, rollback (the registry).", no_args_is_help=True
)
app.add_typer(demo_app, name="demo")
app.add_typer(weights_app, name="weights")
app.add_typer(models_app, name="models")
review_app = typer.Typer(
    help="The evaluation loop: disagreement report and review set, relabel import, history.",
    no_args_is_help=True,
)
app.add_typer(review_app, name="review")

# No default here (None), so that load_config can fall back to $AIR_CONFIG, then the baseline.
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Run config YAML [default: $AIR_CONFIG, else configs/v2_baseline.yaml].",
        show_default=True,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON summary object on stdout.")]
RunOpt = Annotated[
    str,
    typer.Option(
        "--run",
        "--run-ref",  # under torchrun: its parser takes "--run" for its own --run-path
        help="Training run: 'latest', an id or a model version.",
    ),
]
DEFAULT_CONFIG: Path | None = None  # jobs.config.load_config: $AIR_CONFIG, else the baseline


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated(
        f"received signal {signum}: stopped, rolled back, temp files removed; safe to re-run"
    )


def _print_summary(job: str, summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(summary, default=str, sort_keys=True) + "\n")
        return
    sys.stdout.write(human_summary(job, summary))


def _flat(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested summary values as (dotted key, text) rows."""
    if isinstance(value, dict):
        rows: list[tuple[str, str]] = []
        for k, v in value.items():
            rows += _flat(v, f"{prefix}.{k}" if prefix else str(k))
        return rows or [(prefix, "-")]
    if isinstance(value, list):
        text = ", ".join(
            json.dumps(v, default=str) if isinstance(v, dict) else str(v) for v in value
        )
        return [(prefix, text or "-")]
    if isinstance(value, float):
        return [(prefix, f"{value:.4g}")]
    return [(prefix, "-" if value is None else str(value))]


def human_summary(job: str, summary: dict[str, Any]) -> str:
    """A short aligned table for people (``--json`` is for machines): one row per value, and
    a step table (step, status, seconds) for a summary with ``steps``."""
    lines = [f"{job}: {summary.get('status', 'done')}"]
    steps = summary.get("steps")
    rows = [r for k, v in summary.items() if k not in ("status", "steps") for r in _flat(v, k)]
    width = max((len(k) for k, _ in rows), default=0)
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    if isinstance(steps, dict) and steps:
        name_w = max(len(n) for n in steps)
        lines.append(f"  {'step':<{name_w}}  {'status':<16}  seconds")
        for name, out in steps.items():
            out = out if isinstance(out, dict) else {"status": out}
            secs = out.get("seconds")
            secs_text = f"{secs:8.1f}" if isinstance(secs, int | float) else "       -"
            lines.append(f"  {name:<{name_w}}  {str(out.get('status', '-')):<16}  {secs_text}")
    return "\n".join(lines) + "\n"


def run_job(
    job: str,
    func: Callable[..., dict[str, Any] | None],
    config: Path | None,
    as_json: bool,
    **kwargs: Any,
) -> None:
    """Load config, call ``func(cfg, **kwargs)``, print the summary, exit with its code."""
    from jobs import logs
    from jobs.config import load_config

    logs.configure()
    logs.bind(job=job)
    log = logs.get_logger()
    signal.signal(signal.SIGTERM, _on_sigterm)
    started = time.monotonic()
    code = 0
    try:
        cfg = load_config(config)
        summary = func(cfg, **kwargs) or {}
        summary.setdefault("status", "done")
        summary.setdefault("seconds", round(time.monotonic() - started, 3))
        summary = logs.scrub(summary)  # no password in any DSN form (docs/faults.md 32)
        log.info(
            "job_finished", **{k: v for k, v in summary.items() if not isinstance(v, dict | list)}
        )
        _print_summary(job, summary, as_json)
    except JobError as exc:
        code = exc.exit_code
        err = logs.scrub(str(exc))
        log.error("job_failed", error=err, exit_code=code, kind=type(exc).__name__)
        if as_json:
            sys.stdout.write(
                json.dumps({"status": "failed", "error": err, "exit_code": code}) + "\n"
            )
        print(f"error: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        code = EXIT_TRANSIENT
        print("error: interrupted; nothing half-written was kept, safe to re-run", file=sys.stderr)
    except Exception as exc:  # the database lost is transient; everything else is a bug
        # A last line of defence (jobs.db.connect and the DuckDB reads map these already):
        # psycopg's operational errors (a closed connection too) and DuckDB's postgres
        # connection errors are one redacted line and exit 75, never a traceback
        # (docs/faults.md 28).
        import psycopg

        from jobs.db import duckdb_connection_lost, redact

        if isinstance(exc, psycopg.errors.InsufficientPrivilege):
            # the job's database user lacks a grant: a deployment problem, not a bug (exit 2)
            code = 2
            msg = (
                f"permission denied: {' '.join(redact(str(exc)).split())}; the job's database "
                "user needs its role (airatings_export, _train, _score or _review: "
                "docs/contracts.md 'Roles'), whose grants 'airatings migrate' makes"
            )
            log.error("job_failed", error=msg, exit_code=code, kind="InsufficientPrivilege")
            if as_json:
                sys.stdout.write(
                    json.dumps({"status": "failed", "error": msg, "exit_code": code}) + "\n"
                )
            print(f"error: {msg}", file=sys.stderr)
            raise typer.Exit(code) from None
        lost = isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
        if not lost and "duckdb" in sys.modules:
            import duckdb

            lost = isinstance(exc, duckdb.Error) and duckdb_connection_lost(exc)
        if not lost:
            # A bug: its traceback, any password masked, and exit 1 as for an uncaught error.
            import traceback

            sys.stderr.write(logs.scrub(traceback.format_exc()))
            code = 1
            raise typer.Exit(code) from None
        code = EXIT_TRANSIENT
        msg = "database unavailable: " + " ".join(redact(str(exc)).split())
        log.error("job_failed", error=msg, exit_code=code, kind=type(exc).__name__)
        if as_json:
            sys.stdout.write(
                json.dumps({"status": "failed", "error": msg, "exit_code": code}) + "\n"
            )
        print(f"error: {msg}", file=sys.stderr)
    finally:
        logs.clear()
    raise typer.Exit(code)


# ---- db ----------------------------------------------------------------------------------


@db_app.command("start")
def db_start(config: ConfigOpt = DEFAULT_CONFIG, json_: JsonOpt = False) -> None:
    """Start the embedded PostgreSQL under <data_dir>/pg (no-op if running or DATABASE_URL set)."""
    from jobs import dbcli

    run_job("db", dbcli.start, config, json_)


@db_app.command("stop")
def db_stop(config: ConfigOpt = DEFAULT_CONFIG, json_: JsonOpt = False) -> None:
    """Stop the embedded PostgreSQL."""
    from jobs import dbcli

    run_job("db", dbcli.stop, config, json_)


@db_app.command("status")
def db_status(config: ConfigOpt = DEFAULT_CONFIG, json_: JsonOpt = False) -> None:
    """Show whether the database is reachable and which migrations are applied."""
    from jobs import dbcli

    run_job("db", dbcli.status, config, json_)


@db_app.command("url")
def db_url(config: ConfigOpt = DEFAULT_CONFIG) -> None:
    """Print the connection URL jobs use (starts the embedded server if needed)."""
    from jobs.config import load_config
    from jobs.db import database_url

    try:
        print(database_url(load_config(config)))
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(exc.exit_code) from None


@app.command("migrate")
def migrate(config: ConfigOpt = DEFAULT_CONFIG, json_: JsonOpt = False) -> None:
    """Apply this project's SQL migrations (jobs/migrations) in order; idempotent."""
    from jobs import db

    run_job("migrate", db.migrate, config, json_)


# ---- demo --------------------------------------------------------------------------------


@demo_app.command("seed")
def demo_seed(
    config: ConfigOpt = DEFAULT_CONFIG,
    json_: JsonOpt = False,
    snapshots: Annotated[
        int | None, typer.Option(help="Number of snapshots (default: demo.snapshots).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="World seed (default: demo.seed).")] = None,
) -> None:
    """Create the app's tables (if absent) and fill them with a deterministic synthetic world."""
    from jobs.demo import seed as world_seed

    run_job("demo-seed", world_seed.seed, config, json_, snapshots=snapshots, seed=seed)


DemoConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="Run config YAML [default: $AIR_CONFIG, else configs/demo.yaml]."
    ),
]


def _demo_config(config: Path | None) -> Path | None:
    """The demo's own default (configs/demo.yaml) unless --config or $AIR_CONFIG says otherwise."""
    import os

    return config or (None if os.environ.get("AIR_CONFIG") else Path("configs/demo.yaml"))


@demo_app.command("run")
def demo_run(config: DemoConfigOpt = None, json_: JsonOpt = False) -> None:
    """The demo world seeded, then `airatings release` on it (what `just demo` runs)."""
    from jobs import release

    run_job("demo", release.demo, _demo_config(config), json_)


# ---- dataset -----------------------------------------------------------------------------


@app.command(
    "dbt",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def dbt(
    ctx: typer.Context,
    config: ConfigOpt = DEFAULT_CONFIG,
    json_: JsonOpt = False,
) -> None:
    """Run dbt with the profile and vars from the config: `airatings dbt build`."""
    from jobs import dbt_runner

    run_job("dbt", dbt_runner.cli, config, json_, args=list(ctx.args))


@app.command("export")
def export(
    config: ConfigOpt = DEFAULT_CONFIG,
    json_: JsonOpt = False,
    csv: Annotated[
        bool | None,
        typer.Option(
            "--csv/--no-csv", help="Write manifest_*.csv beside the Parquet files (config default)."
        ),
    ] = None,
    notes: Annotated[
        str | None, typer.Option("--notes", help="Free text kept on the run (airatings models).")
    ] = None,
) -> None:
    """Build dbt, freeze the split view into Parquet + CSV manifests, record the run and its labels."""
    from jobs import export

    run_job("export", export.run, config, json_, csv=csv, notes=notes)


@app.command("cache")
def cache(
    config: ConfigOpt = DEFAULT_CONFIG,
    json_: JsonOpt = False,
    run_ref: RunOpt = "latest",
    shard: Annotated[
        str | None, typer.Option(help="I/N: this shard of a sharded (Indexed Job) run.")
    ] = None,
    merge: Annotated[
        bool, typer.Option("--merge", help="Combine shard outputs into the active manifests.")
    ] = False,
) -> None:
    """Download, validate and cache the run's images; write failures and active manifests."""
    from jobs import cache

    run_job("cache", cache.run, config, json_, run_ref=run_ref, shard=shard, merge=merge)


# ---- model -------------------------------------------------------------------------------


@app.command("train")
def train(
    config: ConfigOpt = DEFAULT_CONFIG, json_: JsonOpt = False, run_ref: RunOpt = "latest"
) -> None:
    """Transfer-learn a torchvision backbone on the run's cached images (resumable)."""
    from jobs import train

    run_job("train", train.run, config, json_, run_ref=run_ref)


@app.command("evaluate")
def evaluate(
    config: ConfigOpt = DEFAULT_CONFIG, json_: JsonOpt = False, run_ref: RunOpt = "latest"
) -> None:
    """Test-split metrics, slices, bootstrap CIs, baselines, plots and report.html."""
    from jobs import evaluate

    run_job("evaluate", evaluate.run, config, json_, run_ref=run_ref)


@app.command("export-onnx")
def export_onnx(
    config: ConfigOpt = DEFAULT_CONFIG, json_: JsonOpt = False, run_ref: RunOpt = "latest"
) -> None:
    """Export the best checkpoint to ONNX (resize inside), parity-checked against PyTorch."""
    from jobs import onnx_export

    run_job("export-onnx", onnx_export.run, config, json_, run_ref=run_ref)


ForceOpt = Annotated[
    bool, typer.Option("--force", help="Promote although the checks refuse (needs --reason).")
]
ReasonOpt = Annotated[str | None, typer.Option("--reason", help="Why (kept in the history).")]


@app.command("register")
def register(
    config: ConfigOpt = DEFAULT_CONFIG,
    json_: JsonOpt = False,
    run_ref: RunOpt = "latest",
    promote: Annotated[
        bool, typer.Option("--promote", help="Then move 'production' to it if it is not worse.")
    ] = False,
    force: ForceOpt = False,
    reason: ReasonOpt = None,
) -> None:
    """Register an immutable model version: model.onnx, model_card.json, release.env."""
    from jobs import register as register_job

    run_job(
        "register",
        register_job.run,
        config,
        json_,
        run_ref=run_ref,
        promote=promote,
        force=force,
        reason=reason,
    )


@app.command("release")
def release(
    config: ConfigOpt = DEFAULT_CONFIG,
    json_: JsonOpt = False,
    new: Annotated[
        bool, typer.Option("--new", help="Export a new run even if an unfinished one exists.")
    ] = False,
    notes: Annotated[
        str | None, typer.Option("--notes", help="Free text kept on a new run.")
    ] = None,
    promote: Annotated[
        bool, typer.Option("--promote", help="Promote the registered version if not worse.")
    ] = False,
) -> None:
    """Run the lifecycle in order (migrate, export, cache, train, evaluate, export-onnx,
    register); resumes the latest unfinished run from its status."""
    from jobs import release

    run_job("release", release.run, config, json_, new=new, notes=notes, promote=promote)


@app.command("score")
def score(
    config: ConfigOpt = DEFAULT_CONFIG,
    json_: JsonOpt = False,
    model: Annotated[
        str | None,
        typer.Option(help="Registered version (default: $AI_MODEL_VERSION, else production)."),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(help="Window: 90m, 24h, 2d, 1w or an ISO time (default score.since_hours)."),
    ] = None,
    backfill: Annotated[
        bool, typer.Option("--backfill", help="Every rated snapshot, not only recent ones.")
    ] = False,
    shard: Annotated[
        str | None, typer.Option(help="I/N: this shard (or JOB_COMPLETION_INDEX/JOB_COMPLETIONS).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Score at most this many snapshots.")] = None,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="Retry snapshots that failed permanently.")
    ] = False,
) -> None:
    """Score snapshots with a registered model: inference rows and the webcams' AI fields."""
    from jobs import score as score_job

    run_job(
        "score",
        score_job.run,
        config,
        json_,
        model=model,
        since=since,
        backfill=backfill,
        shard=shard,
        limit=limit,
        retry_failed=retry_failed,
    )


@review_app.command("report")
def review_report(
    config: ConfigOpt = DEFAULT_CONFIG,
    json_: JsonOpt = False,
    model_version: Annotated[
        str | None, typer.Option(help="Registered version (default: production).")
    ] = None,
    cycle: Annotated[str | None, typer.Option(help="Cycle name (default: today, UTC).")] = None,
) -> None:
    """This cycle's disagreement metrics, review set and review page."""
    from jobs import review

    run_job("review", review.report_job, config, json_, model_version=model_version, cycle=cycle)


@review_app.command("import")
def review_import(
    file: Annotated[Path, typer.Argument(help="The review CSV (the page's export).")],
    config: ConfigOpt = DEFAULT_CONFIG,
    json_: JsonOpt = False,
) -> None:
    """Validate a review CSV whole and import its labels into manual_relabels."""
    from jobs import review

    run_job("review", review.import_job, config, json_, file=file)


@review_app.command("history")
def review_history(
    config: ConfigOpt = DEFAULT_CONFIG,
    json_: JsonOpt = False,
    compare: Annotated[
        tuple[str, str] | None, typer.Option(help="NEW OLD: the paired comparison of two versions.")
    ] = None,
    slices: Annotated[bool, typer.Option("--slices", help="Per slice too.")] = False,
) -> None:
    """Metrics per version over the review cycles, a PNG chart, and improved/regressed."""
    from jobs import review

    run_job("review", review.history_job, config, json_, compare=compare, slices=slices)


@weights_app.command("pull")
def weights_pull(
    backbone: Annotated[
        str | None, typer.Argument(help="torchvision backbone (default: train.backbone).")
    ] = None,
    config: ConfigOpt = DEFAULT_CONFIG,
    json_: JsonOpt = False,
    mirror: Annotated[
        str | None, typer.Option("--mirror", help="Base URL standing in for torchvision's host.")
    ] = None,
    url: Annotated[
        str | None,
        typer.Option("--url", help="One weights file by URL (name-<sha256 prefix>.pth)."),
    ] = None,
) -> None:
    """Download torchvision's ImageNet weights into the torch cache, hash-checked."""
    from jobs import weights

    run_job("weights", weights.pull, config, json_, backbone=backbone, mirror=mirror, url=url)


@app.command("provenance")
def provenance(
    version: Annotated[str, typer.Argument(help="Model version (or run id, or 'latest').")],
    config: ConfigOpt = DEFAULT_CONFIG,
    json_: JsonOpt = False,
    snapshot: Annotated[
        int | None, typer.Option("--snapshot", help="One snapshot: its label and ratings.")
    ] = None,
) -> None:
    """Which labels and which people's ratings trained VERSION; what changed since."""
    from jobs import provenance

    run_job("provenance", provenance.run, config, json_, run_ref=version, snapshot=snapshot)


@models_app.command("list")
def models_list(config: ConfigOpt = DEFAULT_CONFIG, json_: JsonOpt = False) -> None:
    """Training runs and model versions: status, registration, aliases, notes."""
    from jobs import registry

    run_job("models", registry.list_models, config, json_)


@models_app.command("show")
def models_show(
    version: Annotated[str, typer.Argument(help="Model version.")],
    config: ConfigOpt = DEFAULT_CONFIG,
    json_: JsonOpt = False,
) -> None:
    """One version: its model card and the production alias history."""
    from jobs import registry

    run_job("models", registry.show, config, json_, version=version)


@models_app.command("promote")
def models_promote(
    version: Annotated[str, typer.Argument(help="Registered model version.")],
    config: ConfigOpt = DEFAULT_CONFIG,
    json_: JsonOpt = False,
    force: ForceOpt = False,
    reason: ReasonOpt = None,
) -> None:
    """Move 'production' to VERSION if it passed parity and is not worse than production."""
    from jobs import registry

    run_job("models", registry.promote, config, json_, version=version, force=force, reason=reason)


@models_app.command("rollback")
def models_rollback(
    config: ConfigOpt = DEFAULT_CONFIG, json_: JsonOpt = False, reason: ReasonOpt = None
) -> None:
    """Move 'production' back to the version it pointed at before."""
    from jobs import registry

    run_job("models", registry.rollback, config, json_, reason=reason)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
