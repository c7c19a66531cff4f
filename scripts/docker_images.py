"""Build the images docker-compose.yml and k8s/ run, on the engine DOCKER_HOST names (else the
private one of scripts/docker-engine.sh), and record each image's size and build time.

    python scripts/docker_images.py build [runtime] [train] [postgres]   # default: all three
    python scripts/docker_images.py check                                # engine + images present?

- ``runtime`` / ``train``: docker/Dockerfile's targets, tagged ``airatings:runtime`` and
  ``airatings:train``. ``postgres``: docker/postgres-standin, tagged as ``AIR_POSTGRES_IMAGE``
  (default ``airatings-postgres-standin:18``), for machines that reach no registry.
- ``AIR_BASE_IMAGE`` picks the base (default: the Dockerfile's official python:3.11-slim-bookworm).
  With no registry reachable, ``scripts/docker-engine.sh base`` makes a local Debian one and
  ``--local-base`` uses it.
- pip's own settings here travel as BuildKit secrets, never as layers or build arguments: the
  CA bundle pip trusts (``cert``) as ``ca``, and a generated pip.conf as ``pipconf`` whose
  local ``file://`` indexes and find-links (``pip config list``) are served to the build over
  loopback for the build's duration (``--network host``).
- Sizes and times go to ``.data/docker/images.json`` and a table on stdout.

Exit 2 with a message naming the fix when no engine answers.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STATE = REPO / ".data" / "docker"
PRIVATE_SOCKET = STATE / "docker.sock"
LOCAL_BASE = "airatings-base:bookworm-py311"
POSTGRES_IMAGE = os.environ.get("AIR_POSTGRES_IMAGE", "airatings-postgres-standin:18")
IMAGES = {
    "runtime": ("airatings:runtime", ["-f", "docker/Dockerfile", "--target", "runtime"]),
    "train": ("airatings:train", ["-f", "docker/Dockerfile", "--target", "train"]),
    "postgres": (POSTGRES_IMAGE, ["-f", "docker/postgres-standin/Dockerfile"]),
}


def docker_env() -> dict[str, str]:
    """The environment for docker and compose: DOCKER_HOST as given, else the private engine's
    socket when it exists, else the client's default."""
    env = dict(os.environ)
    if "DOCKER_HOST" not in env and PRIVATE_SOCKET.exists():
        env["DOCKER_HOST"] = f"unix://{PRIVATE_SOCKET}"
    return env


def docker_cli() -> str:
    """The engine's own CLI when Debian's docker.io is installed (its ``docker build`` has
    BuildKit built in; newer CLIs need the buildx plugin for it), else ``docker``."""
    return os.environ.get("AIR_DOCKER") or (
        "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"
    )


def engine_problem(env: dict[str, str] | None = None) -> str | None:
    """None when an engine answers; else why not, naming the fix."""
    env = env or docker_env()
    where = env.get("DOCKER_HOST", "the docker client's default socket")
    cli = docker_cli()
    if not shutil.which(cli):
        return f"no docker client ({cli}) on PATH; install Docker, or run scripts/docker-engine.sh start (root)"
    try:
        proc = subprocess.run(
            [cli, "version", "--format", "{{.Server.Version}}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        return f"the Docker engine at {where} did not answer within 30 s"
    if proc.returncode != 0 or not proc.stdout.strip():
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        return (
            f"no Docker engine answers at {where} ({detail[0]}); start one "
            "(scripts/docker-engine.sh start, as root) or set DOCKER_HOST"
        )
    return None


def image_exists(tag: str, env: dict[str, str] | None = None) -> bool:
    proc = subprocess.run(
        [docker_cli(), "image", "inspect", tag], env=env or docker_env(), capture_output=True
    )
    return proc.returncode == 0


def _pip_settings() -> dict[str, str]:
    """pip's effective settings (``pip config list``), e.g. {'cert': ..., 'extra-index-url': ...}."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    )
    out: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        out.setdefault(name, value.strip().strip("'\""))
    for var, name in (
        ("PIP_CERT", "cert"),
        ("PIP_INDEX_URL", "index-url"),
        ("PIP_EXTRA_INDEX_URL", "extra-index-url"),
        ("PIP_FIND_LINKS", "find-links"),
    ):
        if os.environ.get(var):
            out[name] = os.environ[var]
    return out


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def build_secrets() -> Iterator[list[str]]:
    """``--secret`` arguments for pip's CA bundle and a pip.conf; local file:// indexes served
    on 127.0.0.1 while the block runs."""
    settings = _pip_settings()
    args: list[str] = []
    cert = settings.get("cert")
    if cert and Path(cert).is_file():
        args += ["--secret", f"id=ca,src={cert}"]
    with tempfile.TemporaryDirectory(prefix="air-pip-") as tmp:
        root = Path(tmp) / "www"
        root.mkdir()
        local: dict[str, Path] = {}

        def served(url: str, kind: str) -> str:
            path = Path(url.removeprefix("file://")) if "://" in url else Path(url)
            if url.startswith(("http://", "https://")) or not path.exists():
                return url
            name = f"{kind}{len(local)}"
            # a PEP 503 tree links its files relative to simple/ (../../files/...): serve its parent
            tree, tail = (path.parent, "simple/") if path.name == "simple" else (path, "")
            (root / name).symlink_to(tree)
            local[name] = tree
            return f"http://127.0.0.1:{{port}}/{name}/{tail}"

        lines = []
        for key in ("index-url", "extra-index-url", "find-links"):
            if settings.get(key):
                urls = [served(u, key.split("-")[0]) for u in settings[key].split()]
                lines.append((key, urls))
        server = None
        if local:
            handler = functools.partial(_Quiet, directory=str(root))
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
            threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1] if server else 0
        if lines:
            conf = Path(tmp) / "pip.conf"
            body = "".join(
                f"{key} = {' '.join(u.format(port=port) for u in urls)}\n" for key, urls in lines
            )
            conf.write_text("[global]\n" + body)
            args += ["--secret", f"id=pipconf,src={conf}"]
        try:
            yield args
        finally:
            if server:
                server.shutdown()
                server.server_close()


def build(names: list[str], base: str | None) -> list[dict[str, object]]:
    env = docker_env() | {"DOCKER_BUILDKIT": "1"}
    problem = engine_problem(env)
    if problem:
        raise SystemExit(f"error: {problem}; nothing was built")
    if base == LOCAL_BASE and not image_exists(LOCAL_BASE, env):
        raise SystemExit(f"error: no {LOCAL_BASE}; make it with scripts/docker-engine.sh base")
    records = []
    with build_secrets() as secrets:
        for name in names:
            tag, args = IMAGES[name]
            cmd = [docker_cli(), "build", *args, "--network", "host", *secrets, "-t", tag]
            if base:
                cmd += ["--build-arg", f"BASE_IMAGE={base}"]
            print(f"building {tag} ...", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            proc = subprocess.run([*cmd, "."], cwd=REPO, env=env)
            seconds = round(time.monotonic() - t0, 1)
            if proc.returncode != 0:
                raise SystemExit(f"error: building {tag} failed (exit {proc.returncode})")
            size = subprocess.run(
                [docker_cli(), "image", "inspect", "--format", "{{.Size}}", tag],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            records.append(
                {"image": tag, "build_s": seconds, "size_mb": round(int(size) / 1e6), "base": base}
            )
    STATE.mkdir(parents=True, exist_ok=True)
    ledger = STATE / "images.json"
    known = json.loads(ledger.read_text()) if ledger.exists() else {}
    known.update({r["image"]: r for r in records})
    ledger.write_text(json.dumps(known, indent=2) + "\n")
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build images (default: all)")
    b.add_argument("images", nargs="*", choices=list(IMAGES), default=[])
    b.add_argument("--local-base", action="store_true", help=f"build FROM {LOCAL_BASE}")
    sub.add_parser("check", help="exit 0 when an engine answers and every image exists")
    args = parser.parse_args()
    if args.command == "check":
        problem = engine_problem()
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            raise SystemExit(2)
        missing = [tag for tag, _ in IMAGES.values() if not image_exists(tag)]
        print(json.dumps({"engine": "ok", "missing_images": missing}))
        raise SystemExit(1 if missing else 0)
    base = LOCAL_BASE if args.local_base else os.environ.get("AIR_BASE_IMAGE")
    records = build(args.images or list(IMAGES), base)
    width = max(len(r["image"]) for r in records)
    for r in records:
        print(f"{r['image']:<{width}}  {r['size_mb']:>6} MB  built in {r['build_s']:>6.1f} s")


if __name__ == "__main__":
    main()
