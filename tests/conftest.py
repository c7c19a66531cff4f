"""Shared fixtures: a real embedded PostgreSQL (one server per session, a fresh database per
test), configs pointing at it and at an isolated artifacts dir, and migrated schemas."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from jobs import db
from jobs.config import Config, load_config

# Fixtures shared by several test files, registered here instead of imported into each one.
pytest_plugins = ["cache_fixtures"]

REPO = Path(__file__).resolve().parents[1]
BASELINE = REPO / "configs" / "v2_baseline.yaml"
DEMO = REPO / "configs" / "demo.yaml"
# The console script of the venv running the tests (works without an activated venv).
AIRATINGS = str(Path(sys.executable).parent / "airatings")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """One embedded PostgreSQL for the whole session.

    TEST_DATABASE_URL=<url> uses a server you run; TEST_POSTGRES=testcontainers starts one in
    Docker (where there is an engine).
    """
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        yield external
        return
    if os.environ.get("TEST_POSTGRES") == "testcontainers":
        # Opt-in, needs a Docker engine (not available on the project's CI machines).
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:18-alpine", driver=None) as pg:
            yield pg.get_connection_url()
        return
    # Not under pytest's rotated basetemp: a concurrent pytest run prunes old basetemps and
    # would delete a live server's data directory.
    root = Path(tempfile.mkdtemp(prefix="airatings-pg-"))
    pgdata = root / "data"
    pgdata.mkdir()
    url = db.start_embedded(pgdata)
    try:
        yield url
    finally:
        db.stop_embedded(pgdata)
        shutil.rmtree(root, ignore_errors=True)


def with_dbname(url: str, dbname: str) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    parts = conninfo_to_dict(url)
    parts["dbname"] = dbname
    return make_conninfo(**parts)


@pytest.fixture
def database_url(pg_server: str) -> Iterator[str]:
    """A fresh, empty database on the session server, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    url = with_dbname(pg_server, name)
    try:
        yield url
    finally:
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')


def air_env(database_url: str, root: Path, **overrides: object) -> dict[str, str]:
    """The environment a job sees: the database, artifacts/data dirs under ``root`` and
    ``section__key=value`` overrides as AIR__SECTION__KEY (for load_config or a subprocess)."""
    env = {
        "DATABASE_URL": database_url,
        "AIR_ARTIFACTS_DIR": str(root / "artifacts"),
        "AIR_DATA_DIR": str(root / "data"),
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        env[f"AIR__{section.upper()}__{name.upper()}"] = (
            str(value).lower() if isinstance(value, bool) else str(value)
        )
    return env


@pytest.fixture
def make_cfg(database_url: str, tmp_path: Path) -> Callable[..., Config]:
    """Build a Config on a given file with the test database and tmp dirs, plus AIR__ overrides.

    ``make_cfg(config=DEMO, train__epochs=2)`` -> AIR__TRAIN__EPOCHS=2.
    """

    def build(config: Path = BASELINE, **overrides: object) -> Config:
        return load_config(config, env=air_env(database_url, tmp_path, **overrides))

    return build


@pytest.fixture
def cfg(make_cfg: Callable[..., Config]) -> Config:
    """The baseline config on a fresh, migrated test database."""
    c = make_cfg()
    db.migrate(c)
    return c


@pytest.fixture
def demo_cfg(make_cfg: Callable[..., Config]) -> Config:
    """The demo config on a fresh, migrated test database."""
    c = make_cfg(DEMO)
    db.migrate(c)
    return c
