"""`just release` through Docker Compose on a real engine, and the Indexed Job contract in
containers (issue [10/11]).

The images are built for real (docker/Dockerfile's runtime and train targets, and the local
PostgreSQL stand-in, on the local Debian base: no registry is reachable here), the demo world is
seeded into the compose ``postgres`` service and the whole chain runs as containers. Then the
registered model, the scores and the review page are checked from the database and the
artifacts volume, and N runtime containers with ``JOB_COMPLETION_INDEX=0..N-1`` cache and
score each snapshot exactly once.

Needs a Docker engine: scripts/docker-engine.sh starts a private one (installing Debian's
docker.io when root), and stops it afterwards when it started it. Without one the tests skip,
saying why, except under CI, where they fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _script(name: str):
    """scripts/<name>.py as a module, by path (not via sys.path: scripts/node_fixture.py would
    shadow tests/node_fixture.py)."""
    spec = importlib.util.spec_from_file_location(
        f"airatings_scripts_{name}", REPO / "scripts" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


compose_release = _script("compose_release")
docker_images = compose_release.docker_images

ENGINE = REPO / "scripts" / "docker-engine.sh"
JUST = str(Path(sys.executable).with_name("just"))  # rust-just, in the venv with pytest
pytestmark = pytest.mark.timeout(1500)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI needs a Docker engine: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def engine() -> Iterator[dict[str, str]]:
    """An engine that answers (started here if need be, and then stopped at the end), with the
    local base image present."""
    started = False
    if docker_images.engine_problem() is not None:
        if os.geteuid() != 0:
            _unavailable(
                f"no Docker engine, and not root to start one: {docker_images.engine_problem()}"
            )
        proc = subprocess.run(["bash", str(ENGINE), "start"], capture_output=True, text=True)
        if proc.returncode != 0:
            _unavailable(f"scripts/docker-engine.sh start failed: {proc.stderr.strip()}")
        started = True
    env = docker_images.docker_env()
    problem = docker_images.engine_problem(env)
    if problem:
        _unavailable(problem)
    base = subprocess.run(["bash", str(ENGINE), "base"], capture_output=True, text=True)
    if base.returncode != 0:
        _unavailable(f"no local base image: {base.stderr.strip()}")
    try:
        yield env
    finally:
        if started:
            subprocess.run(["bash", str(ENGINE), "stop"], capture_output=True)


def _compose(project: str, env: dict[str, str], *args: str, **kw) -> subprocess.CompletedProcess:
    cmd = compose_release.compose_cmd(project, *args, profiles=["localdb", "demo"])
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, **kw)


def _psql(project: str, env: dict[str, str], sql: str, **params: object) -> list[list[str]]:
    """Rows of ``sql`` in the compose postgres; ``:'name'`` / ``:name`` take ``params`` (psql
    variables, quoted by psql: the SQL goes through stdin, where psql interpolates them)."""
    variables = [a for k, v in params.items() for a in ("-v", f"{k}={v}")]
    proc = _compose(
        project, env, "exec", "-T", "-e", "PGPASSWORD=localdb-only", "postgres", "psql",
        "-h", "127.0.0.1", "-U", "airatings", "-d", "airatings", "-AtF", "\t",
        "-v", "ON_ERROR_STOP=1", *variables, input=sql,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [line.split("\t") for line in proc.stdout.splitlines() if line]


def _job(project: str, env: dict[str, str], image: str, *args: str, extra_env: dict[str, str]):
    """One container of ``image`` on the project's network and volumes, hardened like the
    compose jobs, started detached; returns its id."""
    env_file = env["AIR_ENV_FILE"]
    cmd = [
        docker_images.docker_cli(), "run", "-d", "--network", f"{project}_default",
        "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges:true", "--user", "10001:10001",
        "--env-file", str(REPO / "docker" / "defaults.env"), "--env-file", env_file,
        "--mount", f"type=volume,source={project}_artifacts,target=/artifacts",
        "--mount", f"type=volume,source={project}_data,target=/data",
    ]  # fmt: skip
    for key, value in extra_env.items():
        cmd += ["-e", f"{key}={value}"]
    proc = subprocess.run([*cmd, image, *args], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _wait(env: dict[str, str], container: str) -> tuple[int, dict]:
    cli = docker_images.docker_cli()
    code = int(
        subprocess.run(
            [cli, "wait", container], env=env, capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    logs = subprocess.run([cli, "logs", container], env=env, capture_output=True, text=True)
    subprocess.run([cli, "rm", "-f", container], env=env, capture_output=True)
    summary = {}
    for line in reversed(logs.stdout.splitlines()):
        if line.startswith("{"):
            summary = json.loads(line)
            break
    assert code == 0, (code, logs.stdout[-2000:], logs.stderr[-4000:])
    return code, summary


@pytest.fixture(scope="module")
def released(engine, tmp_path_factory) -> Iterator[dict]:
    """`just release --demo` through compose, for real, on a small demo world."""
    project = f"airtest{uuid.uuid4().hex[:8]}"
    env_file = tmp_path_factory.mktemp("compose") / "test.env"
    env_file.write_text(
        "AIR_CONFIG=configs/demo.yaml\n"
        "AIR__DEMO__SNAPSHOTS=400\n"
        "AIR__TRAIN__EPOCHS=2\n"
        "AIR__TRAIN__INPUT_SIZE=64\n"
        "AIR__TRAIN__WEIGHTS=none\n"
        "AIR__EVALUATE__MIN_TEST_ROWS=5\n"  # a small world: a headline MAE, so a promotion
    )
    env = engine | {"AIR_ENV_FILE": str(env_file)}
    proc = subprocess.run(
        [JUST, "release", "--demo", "--local-base", "-p", project],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    try:
        yield {"project": project, "env": env, "proc": proc}
    finally:
        _compose(project, env, "down", "-v", "-t", "5")


def test_just_release_runs_the_chain_through_compose(released) -> None:
    proc, project, env = released["proc"], released["project"], released["env"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    lines = proc.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split() == ["job", "exit"])
    table = dict(line.split() for line in lines[head + 1 :] if len(line.split()) == 2)
    assert table == {s: "0" for s in ["seed", *compose_release.CHAIN]}, proc.stdout

    # The registered, promoted model: immutable row, production alias, files in the volume.
    rows = _psql(
        project,
        env,
        "select r.model_version, r.status, a.alias from airatings.model_training_runs r"
        " join airatings.model_aliases a on a.model_version = r.model_version",
    )
    assert len(rows) == 1 and rows[0][1:] == ["registered", "production"], rows
    version = rows[0][0]
    ls = _compose(project, env, "run", "--rm", "--no-deps", "--entrypoint", "ls", "review",
                  f"/artifacts/models/{version}")  # fmt: skip
    assert ls.returncode == 0, ls.stderr
    assert {"model.onnx", "model_card.json", "release.env"} <= set(ls.stdout.split())

    # The scores: one inference row per rated, cached snapshot, from that version; the
    # webcams' AI fields point at it.
    ((scored, distinct, versions),) = _psql(
        project,
        env,
        "select count(*), count(distinct snapshot_id), string_agg(distinct model_version, ',')"
        " from public.snapshot_ai_inferences",
    )
    assert int(scored) == int(distinct) > 0 and versions == version
    ((webcams,),) = _psql(
        project, env, "select count(*) from public.webcams where ai_model_version = :'v'", v=version
    )
    assert int(webcams) > 0

    # The review page, copied out of the artifacts volume and opened in headless Chromium.
    from browser import inspect_page

    ((cycle, items),) = _psql(
        project,
        env,
        "select c.cycle, count(i.*) from airatings.review_cycles c join airatings.review_items i"
        " using (cycle, model_version) where c.model_version = :'v' group by c.cycle",
        v=version,
    )
    out = Path(env["AIR_ENV_FILE"]).parent / "review"
    cp = _compose(project, env, "cp", f"review:/artifacts/review/{cycle}/{version}", str(out))
    assert cp.returncode == 0, cp.stderr
    seen = inspect_page(out / "review.html")
    assert seen["errors"] == [], seen["errors"]
    assert seen["cards"] == int(items) > 0
    assert seen["decoded"] == seen["images"] > 0


@pytest.mark.parametrize("shards", [3])
def test_indexed_job_contract_in_containers(released, shards: int) -> None:
    """N runtime containers with JOB_COMPLETION_INDEX=i and JOB_COMPLETIONS=N (what an Indexed
    Job gives each pod) against one database: the cache shards handle every URL exactly once
    and their merge equals the release's manifests; the score shards, over a wiped inference
    table, write one row per snapshot."""
    project, env = released["project"], released["env"]
    assert released["proc"].returncode == 0, "the release failed; see the test above"

    # A second run of the same data (another training config): export, then the cache as an
    # Indexed Job of N pods, then the merge.
    other = {"AIR__TRAIN__EPOCHS": "3"}
    exported = _wait(env, _job(project, env, "airatings:runtime", "export", "--json",
                               extra_env=other))[1]  # fmt: skip
    run_id = exported["run_id"]
    ids = [
        _job(project, env, "airatings:runtime", "cache", "--json",
             extra_env={**other, "JOB_COMPLETION_INDEX": str(i), "JOB_COMPLETIONS": str(shards)})
        for i in range(shards)
    ]  # fmt: skip
    parts = [_wait(env, c)[1] for c in ids]
    assert sorted(p["shard"] for p in parts) == [f"{i}/{shards}" for i in range(shards)]
    assert {p["run_id"] for p in parts} == {run_id}
    ((urls,),) = _psql(
        project,
        env,
        "select count(distinct s.firebase_url) from airatings.model_training_snapshot_labels l"
        " join public.webcam_snapshots s on s.id = l.snapshot_id where l.training_run_id = :run",
        run=run_id,
    )
    assert all(p["urls"] > 0 for p in parts) and sum(p["urls"] for p in parts) == int(urls)
    # the first run stored every image: only the URLs that failed then are asked again
    assert sum(p["fetched"] for p in parts) == sum(p["failed_urls"] for p in parts), parts
    assert sum(p["from_index"] for p in parts) == int(urls) - sum(p["fetched"] for p in parts)
    merged = _wait(env, _job(project, env, "airatings:runtime", "cache", "--merge", "--json",
                             extra_env=other))[1]  # fmt: skip
    assert merged["status"] == "cached" and merged["shards"] == shards, merged
    # the same data and split: the merged manifests are byte-identical to the first run's,
    # which its unsharded cache step wrote
    ((first,),) = _psql(
        project,
        env,
        "select r.params_json::jsonb -> 'cache' -> 'active_files' from airatings.model_training_runs r"
        " join airatings.model_aliases a on a.model_version = r.model_version",
    )
    assert merged["active_files"] == json.loads(first), merged

    before = _psql(project, env, "select count(*) from public.snapshot_ai_inferences")[0][0]
    _psql(project, env, "delete from public.snapshot_ai_inferences")
    ids = [
        _job(project, env, "airatings:runtime", "score", "--backfill", "--json",
             extra_env={"JOB_COMPLETION_INDEX": str(i), "JOB_COMPLETIONS": str(shards)})
        for i in range(shards)
    ]  # fmt: skip
    scores = [_wait(env, c)[1] for c in ids]
    ((rows, distinct),) = _psql(
        project, env,
        "select count(*), count(distinct snapshot_id) from public.snapshot_ai_inferences",
    )  # fmt: skip
    assert int(rows) == int(distinct) == int(before)
    assert all(s["scored"] > 0 for s in scores), scores  # every shard did a share
    assert sum(s["scored"] for s in scores) == int(rows)
