"""`airatings export`: dbt build -> one consistent read of the split mart -> Parquet manifests,
a dataset hash, and the run row with every label it used (one transaction).

Steps (each safe to repeat):

1. Take the export advisory lock; a concurrent second export exits 0 saying so.
2. ``dbt build --select +fct_dataset_splits`` (models, data tests, unit tests). Any failure is
   an InputError naming the failed nodes: a failing test never reaches a manifest.
3. DuckDB attaches PostgreSQL read-only (postgres_scanner loaded from the PyPI package, never
   downloaded) and reads ``fct_dataset_splits`` (sorted by snapshot id) and the gate counts in
   one DuckDB transaction, into Arrow. Manifests and label rows are both written from that one
   Arrow table, so they are equal by construction even while the app keeps writing.
4. Dataset hash = sha256 over the canonical export parameters and the canonical content of
   the full manifest (Arrow IPC of the sorted table, null slots normalised): not Parquet bytes,
   so a Parquet writer upgrade does not change a dataset's identity.
5. Manifests go to ``<artifacts>/datasets/<hash>/`` via temp file + check + rename; a dataset
   directory that is already complete (``dataset.json`` and matching sha256s) is reused as is.
6. Same dataset hash and same config hash as an existing non-failed run: that run is returned
   (status ``already_exported``), nothing new is written, so ``airatings export --json`` twice
   prints the same run and hash. A changed config (e.g. training settings) with the same data
   makes a new run that reuses the dataset directory.
7. A model version ``<version_prefix>_<yyyy_mm_dd>[_n]`` is reserved (committed on its own, so
   it is never reused even if the next step fails), then the run row and all its label rows
   (COPY) commit in one transaction.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from psycopg import sql

from jobs import artifacts, db, dbt_runner, paths, runs
from jobs.errors import InputError, TransientError
from jobs.logs import bind, get_logger

if TYPE_CHECKING:
    import psycopg
    import pyarrow as pa

    from jobs.config import Config

log = get_logger()

# 2: label provenance columns (rating_ids, relabel_id, label_formula_version) read and hashed
FORMAT_VERSION = 2
SPLITS = ("train", "val", "test")
SPLITS_MODEL = "fct_dataset_splits"
CANDIDATES_MODEL = "fct_label_candidates"
DROP_REASONS = (
    "missing_url",
    "url_scheme_not_allowed",
    "url_malformed",
    "too_few_ratings",
    "label_out_of_range",
    "duplicate_snapshot",
)
LABEL_COLUMNS = (
    "training_run_id",
    "snapshot_id",
    "label_source",
    "label_value",
    "split",
    "rating_ids",
    "relabel_id",
    "label_formula_version",
)


def manifest_schema() -> pa.Schema:
    """The manifest contract (jobs/manifests.py), in column order."""
    from jobs.manifests import MANIFEST_SCHEMA

    return MANIFEST_SCHEMA


def provenance_schema() -> pa.Schema:
    """Columns read with the manifest rows that go only to the label rows (and the hash): the
    app's rating ids behind each label, the reviewed label's id, the label formula version."""
    import pyarrow as pa

    return pa.schema(
        [
            ("rating_ids", pa.list_(pa.int64())),
            ("relabel_id", pa.int64()),
            ("label_formula_version", pa.int16()),
        ]
    )


def read_schema() -> pa.Schema:
    """What the export reads from the split mart: the manifest columns, then provenance."""
    import pyarrow as pa

    return pa.schema([*manifest_schema(), *provenance_schema()])


# ---- reading ---------------------------------------------------------------------------


def _duck_literal(value: str) -> str:
    """A DuckDB string literal (ATTACH takes no bound parameters): quotes doubled."""
    if "\x00" in value:
        raise InputError("database URL contains a NUL character")
    return "'" + value.replace("'", "''") + "'"


def _duck_ident(name: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise InputError(f"{name!r} is not a plain SQL identifier")
    return '"' + name + '"'


def duckdb_connect(cfg: Config) -> Any:
    """An in-memory DuckDB with postgres_scanner loaded from the PyPI package (no downloads)
    and the config's PostgreSQL attached read-only as ``pg``."""
    import duckdb
    import duckdb_extensions

    ext_dir = paths.of(cfg).duckdb_extensions
    ext_dir.mkdir(parents=True, exist_ok=True)
    url = db.database_url(cfg)
    # libpq conninfo: keepalives, statement and lock timeouts like every job connection
    dsn = db.conninfo(cfg)
    con = duckdb.connect(
        config={
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "extension_directory": str(ext_dir),
        }
    )
    try:
        try:  # installed into ext_dir by an earlier run
            con.execute("load postgres_scanner")
        except duckdb.Error:
            duckdb_extensions.import_extension("postgres_scanner", con=con)
            con.execute("load postgres_scanner")
        con.execute("set TimeZone = 'UTC'")
        con.execute(f"attach {_duck_literal(dsn)} as pg (type postgres, read_only)")
    except duckdb.Error as exc:
        con.close()
        if not (isinstance(exc, duckdb.IOException) or db.duckdb_connection_lost(exc)):
            raise
        raise TransientError(
            f"DuckDB could not attach PostgreSQL at {db.redact(url)}: {db.redact(str(exc))}"
        ) from None
    except BaseException:
        con.close()
        raise
    return con


def splits_query(cfg: Config) -> str:
    """The query the export (and the benchmark's raw baseline) runs through DuckDB."""
    cols = ", ".join(_duck_ident(f.name) for f in read_schema())
    rel = f"pg.{_duck_ident(cfg.database.dbt_schema)}.{_duck_ident(SPLITS_MODEL)}"
    return f"select {cols} from {rel} order by snapshot_id"  # noqa: S608 (identifiers checked)


def read_snapshot(cfg: Config, con: Any | None = None) -> tuple[pa.Table, dict[str, int], int]:
    """(manifest table sorted by snapshot id, drop counts per reason, candidate count), read in
    one DuckDB transaction (one PostgreSQL snapshot per scan; the marts are tables that only
    a dbt build under the dbt lock replaces). The database lost mid-read (server gone, a
    killed backend, statement_timeout) is TransientError (exit 75, docs/faults.md 28)."""
    import contextlib

    import duckdb

    own = con is None
    con = duckdb_connect(cfg) if own else con
    try:
        con.execute("begin transaction")
        table = con.execute(splits_query(cfg)).to_arrow_table()
        cand = f"pg.{_duck_ident(cfg.database.dbt_schema)}.{_duck_ident(CANDIDATES_MODEL)}"
        rows = con.execute(
            f"select drop_reason, count(*) from {cand} group by drop_reason"  # noqa: S608
        ).fetchall()
        con.execute("commit")
    except duckdb.Error as exc:
        # End DuckDB's transaction here, where a failing ROLLBACK is a Python exception: left
        # to close(), a ROLLBACK on a dead postgres connection aborts the process (SIGABRT,
        # duckdb 1.5 postgres_scanner: an exception thrown from a destructor).
        with contextlib.suppress(duckdb.Error):
            con.execute("rollback")
        if not db.duckdb_connection_lost(exc):
            raise
        where = cfg.database.url or "the embedded PostgreSQL"
        raise TransientError(
            f"reading {SPLITS_MODEL} through DuckDB: "
            + db.transient_message(exc, where, cfg.database)
        ) from None
    finally:
        if own:
            con.close()
    dropped = {r: 0 for r in DROP_REASONS}
    total = 0
    for reason, n in rows:
        total += n
        if reason is not None:
            dropped[reason] = dropped.get(reason, 0) + n
    return conform(table), dropped, total


def conform(table: pa.Table) -> pa.Table:
    """Cast to the read schema (manifest columns + provenance; order, types, UTC) and check
    sort + uniqueness."""
    import pyarrow.compute as pc

    schema = read_schema()
    table = table.select(schema.names).cast(schema).combine_chunks()
    ids = table.column("snapshot_id")
    if table.num_rows > 1 and not pc.all(pc.greater(ids[1:], ids[:-1])).as_py():
        raise InputError(f"{SPLITS_MODEL} returned unsorted or duplicate snapshot ids")
    return table


# ---- identity ----------------------------------------------------------------------------


def export_params(cfg: Config, *, csv: bool = True) -> dict[str, Any]:
    """What defines a dataset besides its rows (hashed). Schema names say where, not what."""
    dbt_vars = {
        k: v
        for k, v in dbt_runner.checked_vars(cfg).items()
        if k not in ("app_schema", "ml_schema")
    }
    return {
        "format_version": FORMAT_VERSION,
        "source_model": SPLITS_MODEL,
        "columns": [[f.name, str(f.type)] for f in read_schema()],
        "dbt_vars": dbt_vars,
        # the files written are part of the dataset's identity: manifest_*.csv are hashed too
        "formats": ["parquet", "csv"] if csv else ["parquet"],
    }


class _HashSink:
    def __init__(self, h: Any) -> None:
        self.h = h
        self.closed = False

    def write(self, data: Any) -> int:
        self.h.update(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def dataset_hash(table: pa.Table, params: dict[str, Any]) -> str:
    """sha256 over canonical params JSON + the Arrow IPC stream of the table with every null
    slot replaced by a fixed value and its validity hashed as a separate boolean column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    h = hashlib.sha256()
    h.update(json.dumps(params, sort_keys=True, separators=(",", ":")).encode())
    h.update(b"\n")
    cols, names = [], []
    for name, col in zip(table.column_names, table.columns, strict=True):
        if col.null_count:
            zero = (
                pa.scalar("" if pa.types.is_string(col.type) else 0, type=col.type)
                if not pa.types.is_list(col.type)
                else pa.scalar([], type=col.type)
            )
            cols += [pc.fill_null(col, zero), pc.is_valid(col)]
            names += [name, f"{name}.__valid"]
        else:
            cols.append(col)
            names.append(name)
    canon = pa.Table.from_arrays(cols, names=names).combine_chunks()
    sink = pa.PythonFile(_HashSink(h), mode="w")
    with pa.ipc.new_stream(sink, canon.schema) as writer:
        writer.write_table(canon)
    return h.hexdigest()


# ---- writing -----------------------------------------------------------------------------


def _parquet_check(rows: int):
    def check(path: Path) -> None:
        import pyarrow.parquet as pq

        meta = pq.read_metadata(path)  # footer readable
        if meta.num_rows != rows:
            raise InputError(f"{path.name}: wrote {meta.num_rows} rows, expected {rows}")

    return check


def _write_parquet(table: pa.Table, final: Path) -> None:
    import pyarrow.parquet as pq

    with artifacts.atomic_path(final, check=_parquet_check(table.num_rows)) as tmp:
        pq.write_table(table, tmp, compression="snappy", row_group_size=256 * 1024)


def _write_csv(con: Any, table: pa.Table, final: Path) -> None:
    import duckdb

    own = con is None
    con = duckdb.connect() if own else con
    try:
        con.execute("set TimeZone = 'UTC'")
        con.register("manifest_view", table)
        with artifacts.atomic_path(final) as tmp:
            target = _duck_literal(str(tmp))
            con.execute(f"copy (select * from manifest_view) to {target} (format csv, header)")  # noqa: S608
        con.unregister("manifest_view")
    finally:
        if own:
            con.close()


def _split_tables(table: pa.Table) -> dict[str, pa.Table]:
    """The manifest files' contents: the manifest columns only (provenance goes to the label
    rows), the full table and one per split."""
    import pyarrow.compute as pc

    table = table.select(manifest_schema().names)
    out = {"full": table}
    for s in SPLITS:
        out[s] = table.filter(pc.equal(table.column("split"), s))
    return out


def write_dataset(
    cfg: Config, table: pa.Table, digest: str, params: dict[str, Any], *, csv: bool
) -> dict[str, Any]:
    """Write (or reuse) ``datasets/<digest>/``; returns the dataset record (dataset.json).

    A file already there whose sha256 matches the record is kept; anything else is rewritten.
    """
    layout = paths.of(cfg).dataset(digest)
    ddir = layout.root
    ddir.mkdir(parents=True, exist_ok=True)
    artifacts.sweep_temp(ddir)
    record_path = layout.record
    parts = _split_tables(table)
    record: dict[str, Any] | None = None
    if record_path.exists():
        try:
            record = json.loads(record_path.read_text())
        except ValueError:
            record = None
    known_files = (record or {}).get("files", {})
    writers = {"parquet": _write_parquet, "csv": lambda part, final: _write_csv(None, part, final)}
    jobs = [(name, fmt) for fmt in (["parquet", "csv"] if csv else ["parquet"]) for name in parts]

    def write_one(job: tuple[str, str]) -> tuple[str, dict[str, Any], bool]:
        name, fmt = job
        part, final = parts[name], layout.manifest(name, fmt)
        known = known_files.get(final.name)
        sha = artifacts.sha256_file(final) if known and final.exists() else None
        wrote = sha is None or sha != known["sha256"]
        if wrote:
            writers[fmt](part, final)
            sha = artifacts.sha256_file(final)
        info = {"rows": part.num_rows, "bytes": final.stat().st_size, "sha256": sha}
        return final.name, info, wrote

    # pyarrow and DuckDB release the GIL while encoding: the files are written side by side
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = list(pool.map(write_one, jobs))
    files = {fname: info for fname, info, _ in done}
    new_record = {
        "dataset_hash": digest,
        "params": params,
        "counts": {s: parts[s].num_rows for s in SPLITS} | {"total": table.num_rows},
        "files": dict(sorted(files.items())),
    }
    if new_record != record:
        artifacts.atomic_write_text(
            record_path, json.dumps(new_record, indent=2, sort_keys=True) + "\n"
        )
    return {"dir": ddir, "record": new_record, "reused": not any(w for _, _, w in done)}


# ---- the run record ----------------------------------------------------------------------


def reserve_version(cfg: Config, today: datetime | None = None) -> str:
    """Reserve ``<prefix>_<yyyy_mm_dd>``, then ``_2``, ``_3``... (committed at once, never reused)."""
    import psycopg

    day = (today or datetime.now(UTC)).strftime("%Y_%m_%d")
    base = f"{cfg.project.version_prefix}_{day}"
    pattern = re.compile(rf"^{re.escape(base)}(?:_(\d+))?$")
    reservations = runs.table(cfg, "model_version_reservations")
    run_table = runs.table(cfg, "model_training_runs")
    with db.connect(cfg, autocommit=True) as conn:
        for _ in range(100):
            taken = conn.execute(
                sql.SQL(
                    "select model_version from {} where model_version like %s"
                    " union select model_version from {} where model_version like %s"
                ).format(reservations, run_table),
                (base.replace("_", r"\_") + "%", base.replace("_", r"\_") + "%"),
            ).fetchall()
            numbers = [int(m.group(1) or 1) for (v,) in taken if (m := pattern.match(v))]
            n = max(numbers, default=0) + 1
            version = base if n == 1 else f"{base}_{n}"
            try:
                conn.execute(
                    sql.SQL("insert into {} (model_version) values (%s)").format(reservations),
                    (version,),
                )
                return version
            except psycopg.errors.UniqueViolation:
                continue
    raise TransientError(f"could not reserve a model version starting {base}; try again")


def _library_versions() -> dict[str, str]:
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in (
        "duckdb",
        "duckdb-extension-postgres-scanner",
        "pyarrow",
        "dbt-core",
        "dbt-postgres",
        "psycopg",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def pg_array_literal(lists: pa.ChunkedArray | pa.Array) -> pa.Array:
    """list<int64> -> PostgreSQL array literals ('{1,2,3}'; '{}' for an empty or null list),
    vectorised in Arrow (no Python loop per row)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    lists = pc.fill_null(lists, pa.scalar([], lists.type))
    joined = pc.binary_join(pc.cast(lists, pa.list_(pa.string())), ",")
    return pc.binary_join_element_wise("{", joined, "}", "")


def _labels_csv(table: pa.Table, run_id: int) -> bytes:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    labels = pa.table(
        {
            "training_run_id": pa.repeat(pa.scalar(run_id, pa.int64()), table.num_rows),
            "snapshot_id": table.column("snapshot_id"),
            "label_source": table.column("label_source"),
            "label_value": table.column("label_value"),
            "split": table.column("split"),
            "rating_ids": pg_array_literal(table.column("rating_ids")),
            "relabel_id": table.column("relabel_id"),
            "label_formula_version": table.column("label_formula_version"),
        }
    )
    buf = pa.BufferOutputStream()
    pacsv.write_csv(labels, buf, pacsv.WriteOptions(include_header=False, quoting_style="needed"))
    return buf.getvalue().to_pybytes()


def copy_labels(conn: psycopg.Connection, cfg: Config, payload: bytes) -> None:
    """COPY pre-serialised CSV label rows into model_training_snapshot_labels."""
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in LABEL_COLUMNS)
    q = sql.SQL("copy {} ({}) from stdin (format csv)").format(
        runs.table(cfg, "model_training_snapshot_labels"), cols
    )
    view = memoryview(payload)
    step = 8 << 20
    with conn.cursor() as cur, cur.copy(q) as cp:
        for i in range(0, len(view), step):
            cp.write(view[i : i + step])


def _insert_labels(conn: psycopg.Connection, cfg: Config, run_id: int, table: pa.Table) -> int:
    """Every manifest row as a label row of the run (inside the caller's transaction)."""
    copy_labels(conn, cfg, _labels_csv(table, run_id))
    return table.num_rows


def set_notes(cfg: Config, run_id: int, notes: str) -> None:
    """Replace a run's free-text notes (shown by `airatings models`)."""
    with db.connect(cfg) as conn:
        conn.execute(
            sql.SQL("update {} set notes = %s, updated_at = now() where id = %s").format(
                runs.table(cfg, "model_training_runs")
            ),
            (notes, run_id),
        )


def _find_existing(conn: psycopg.Connection, cfg: Config, digest: str) -> runs.Run | None:
    row = conn.execute(
        sql.SQL(
            "select id from {} where dataset_hash = %s and config_hash = %s and status <> 'failed'"
            " order by id desc limit 1"
        ).format(runs.table(cfg, "model_training_runs")),
        (digest, cfg.config_hash),
    ).fetchone()
    return runs.get_run(conn, cfg, row[0]) if row else None


def _check_migrated(cfg: Config) -> None:
    with db.connect(cfg) as conn:
        for name in (
            "model_training_runs",
            "model_training_snapshot_labels",
            "manual_relabels",
            "model_version_reservations",
        ):
            qualified = sql.Identifier(cfg.database.ml_schema, name).as_string(conn)
            found = conn.execute("select to_regclass(%s)", (qualified,)).fetchone()[0]
            if found is None:
                raise InputError(
                    f"table {cfg.database.ml_schema}.{name} is missing: run 'airatings migrate' first"
                )


# ---- the job -----------------------------------------------------------------------------


def run(
    cfg: Config,
    csv: bool | None = None,
    notes: str | None = None,
    select: str | None = None,
) -> dict[str, Any]:
    """Build and test dbt (``select``: the training selection by default; a release builds the
    whole project), then export (see the module docstring). Returns the summary."""
    dbt_runner.checked_vars(cfg)
    with db.job_lock(cfg, "export") as held:
        if not held:
            log.info("export_skipped", reason="another export holds the lock")
            return {
                "status": "skipped",
                "reason": "another export is running on this database; nothing done",
            }
        _check_migrated(cfg)
        started = time.monotonic()
        # The dbt lock is held from the build until the marts are read: another `dbt run`
        # (which takes the same lock) cannot swap in tables this export's tests did not pass.
        with dbt_runner.relations_lock(cfg):
            built = dbt_runner.build(cfg, select or dbt_runner.TRAINING_SELECTION, lock=False)
            built["seconds"] = round(time.monotonic() - started, 3)
            snapshot = read_snapshot(cfg)
        return export_dataset(
            cfg,
            csv=cfg.dataset.write_csv if csv is None else csv,
            dbt_summary=built,
            snapshot=snapshot,
            notes=notes,
        )


def export_dataset(
    cfg: Config,
    *,
    csv: bool = True,
    dbt_summary: dict[str, Any] | None = None,
    snapshot: tuple[pa.Table, dict[str, int], int] | None = None,
    notes: str | None = None,
) -> dict[str, Any]:
    """Everything after ``dbt build``: read (unless ``snapshot`` is given: what
    :func:`read_snapshot` returned), hash, write, record. The caller holds the export lock.

    ``notes`` go to ``model_training_runs.notes`` (also of a reused run: notes describe a run,
    they are not part of its identity)."""
    started = time.monotonic()
    table, dropped, candidates = read_snapshot(cfg) if snapshot is None else snapshot
    if table.num_rows == 0:
        raise InputError(
            f"{SPLITS_MODEL} is empty ({candidates} candidates, dropped {dropped}): nothing to train on"
        )
    params = export_params(cfg, csv=csv)
    digest = dataset_hash(table, params)
    written = write_dataset(cfg, table, digest, params, csv=csv)
    record = written["record"]
    counts = record["counts"]
    base = {
        "dataset_hash": digest,
        "dataset_dir": str(written["dir"]),
        "counts": counts,
        "dropped": dropped,
        "candidates": candidates,
        "reused_dataset": written["reused"],
    }
    with db.connect(cfg) as conn:
        existing = _find_existing(conn, cfg, digest)
    if existing is not None:
        bind(run_id=existing.id, model_version=existing.model_version)
        if notes is not None:
            set_notes(cfg, existing.id, notes)
        log.info("export_reused", dataset_hash=digest, run_id=existing.id)
        return {
            "status": "already_exported",
            "run_id": existing.id,
            "model_version": existing.model_version,
        } | base

    version = reserve_version(cfg)
    bind(model_version=version)
    provenance = {
        "dataset_dir": str(written["dir"]),
        "dataset_hash": digest,
        "counts": counts,
        "dropped": dropped,
        "candidates": candidates,
        "export_params": params,
        "dbt_vars": dbt_runner.checked_vars(cfg),
        "dbt": dbt_summary,
        "config_hash": cfg.config_hash,
        "files": record["files"],
        "libraries": _library_versions(),
        "exported_at": datetime.now(UTC).isoformat(),
    }
    with db.connect(cfg) as conn, conn.transaction():
        db.check_locks()  # still the only exporter: never commit beside a twin (exit 75)
        run_id = conn.execute(
            sql.SQL(
                "insert into {}"
                " (model_version, status, dataset_hash, config_hash, params_json, notes)"
                " values (%s, 'exported', %s, %s, %s::jsonb, %s) returning id"
            ).format(runs.table(cfg, "model_training_runs")),
            (
                version,
                digest,
                cfg.config_hash,
                json.dumps({"export": provenance, "config": cfg.hashed_view}, default=str),
                notes,
            ),
        ).fetchone()[0]
        bind(run_id=run_id)
        inserted = _insert_labels(conn, cfg, run_id, table)
        if inserted != table.num_rows:
            raise InputError(f"inserted {inserted} label rows for {table.num_rows} manifest rows")
    seconds = round(time.monotonic() - started, 3)
    log.info(
        "dataset_exported",
        run_id=run_id,
        model_version=version,
        dataset_hash=digest,
        rows=table.num_rows,
        train=counts["train"],
        val=counts["val"],
        test=counts["test"],
        dataset_dir=str(written["dir"]),
        seconds=seconds,
    )
    return {"status": "exported", "run_id": run_id, "model_version": version} | base
