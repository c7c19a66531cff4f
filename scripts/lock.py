"""requirements.lock: every package `just setup` installs, at an exact version with hashes.

`python scripts/lock.py` (`just lock`) resolves pyproject.toml's dependencies, all its extras,
its build-system.requires and pip itself with `uv pip compile --universal --generate-hashes`
and writes requirements.lock. The lock is a plain pip requirements file, so `just setup`
installs it with the pip that `python3 -m venv` ships (`--require-hashes --no-deps`), no other
tool needed. It holds no index URL and no local path: the indexes come from this machine's pip
configuration (`pip config list`: index-url, extra-index-url, find-links, no-index, constraint,
cert, trusted-host) at lock time only.

`python scripts/lock.py --check` (`just lint`, tests/test_lock.py) exits 1 naming each way the
lock and pyproject.toml disagree: inputs changed since `just lock` (the header's digest),
a requirement missing or pinned at a version its specifier refuses, a pin that is not `==` or
has no hash, two pins active at once, or a pin that nothing in pyproject.toml needs.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "requirements.lock"
# Used when uv is not installed in the running interpreter; the version is pinned so two
# people running `just lock` on the same inputs write the same file. Installed with
# `pip --target` beside the venv's packages, so the venv itself stays exactly the lock.
UV = "uv==0.13.9"
UV_TOOLS = ROOT / ".venv" / "lock-tools"
# Locked beside pyproject.toml's own requirements: the installer, and (from build-system.requires)
# the backend that `pip install --no-build-isolation -e .` builds the project with.
TOOLS = ("pip",)
TOOLS_LABEL = "scripts/lock.py (pip, build-system.requires)"
PROJECT_LABEL = "{name} (pyproject.toml)"
DIGEST_PREFIX = "# inputs-sha256: "
# The environment every check is evaluated in: the project's floor on the CI platform.
LINUX_X86_64_PY311 = {
    "implementation_name": "cpython",
    "implementation_version": "3.11.0",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "platform_python_implementation": "CPython",
    "platform_release": "",
    "platform_system": "Linux",
    "platform_version": "",
    "python_full_version": "3.11.0",
    "python_version": "3.11",
    "sys_platform": "linux",
}
HASH = re.compile(r"--hash=(sha256|sha384|sha512):([0-9a-f]+)")


class LockError(Exception):
    """The lock cannot be written (bad pyproject.toml, resolution failed): exit 2."""


@dataclass
class Pin:
    name: str  # canonical
    version: str  # "" when the line is not a single `==` pin
    marker: object  # packaging.markers.Marker or None
    hashes: list[str]
    line: str
    via: list[str] = field(default_factory=list)


def lock_inputs(pyproject: dict) -> dict:
    """Everything in pyproject.toml (plus TOOLS) that decides what the lock holds."""
    project = pyproject.get("project", {})
    return {
        "requires-python": project.get("requires-python", ""),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
        "build-system.requires": pyproject.get("build-system", {}).get("requires", []),
        "tools": list(TOOLS),
    }


def inputs_digest(pyproject: dict) -> str:
    canonical = json.dumps(lock_inputs(pyproject), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def parse_lock(text: str) -> tuple[str | None, list[Pin]]:
    """The header's digest and the pins of a `uv pip compile --generate-hashes` file."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    digest = None
    pins: list[Pin] = []
    logical = ""
    for raw in text.splitlines():
        if logical or not raw.lstrip().startswith("#"):
            logical += raw.rstrip("\\").strip() + " "
            if raw.rstrip().endswith("\\"):
                continue
            line, logical = logical.strip(), ""
            if not line:
                continue
            spec = line.split(" --hash=", 1)[0].strip()
            try:
                req = Requirement(spec)
            except InvalidRequirement:
                pins.append(Pin(spec, "", None, [], line))
                continue
            specs = list(req.specifier)
            exact = len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version
            pins.append(
                Pin(
                    canonicalize_name(req.name),
                    specs[0].version if exact else "",
                    req.marker,
                    [f"{algo}:{value}" for algo, value in HASH.findall(line)],
                    line,
                )
            )
        elif raw.startswith(DIGEST_PREFIX):
            digest = raw[len(DIGEST_PREFIX) :].strip()
        elif pins and raw.startswith("    #"):
            body = raw.strip()[1:].strip()
            body = body[3:].strip() if body.startswith("via") else body
            if body:
                pins[-1].via.append(body)
    return digest, pins


def _requirements(pyproject: dict) -> list[tuple[str, object]]:
    """(where, Requirement) for every requirement the lock must satisfy."""
    from packaging.requirements import Requirement

    inputs = lock_inputs(pyproject)
    found = [("dependencies", Requirement(r)) for r in inputs["dependencies"]]
    for extra, reqs in sorted(inputs["optional-dependencies"].items()):
        found += [(f"optional-dependencies.{extra}", Requirement(r)) for r in reqs]
    found += [("build-system.requires", Requirement(r)) for r in inputs["build-system.requires"]]
    found += [("scripts/lock.py TOOLS", Requirement(r)) for r in inputs["tools"]]
    return found


def check(pyproject_path: Path = PYPROJECT, lock_path: Path = LOCK) -> list[str]:
    """Every way the lock disagrees with pyproject.toml; empty when they agree."""
    from packaging.utils import canonicalize_name

    if not lock_path.is_file():
        return [f"{lock_path.name} is missing: run `just lock`"]
    pyproject = tomllib.loads(pyproject_path.read_text())
    digest, pins = parse_lock(lock_path.read_text())
    problems = []
    if digest is None:
        problems.append(f"{lock_path.name} has no `{DIGEST_PREFIX.strip()}` header line")
    elif digest != inputs_digest(pyproject):
        problems.append(
            f"{lock_path.name} is stale: the dependency tables of {pyproject_path.name} changed "
            "since it was written; run `just lock`"
        )
    for pin in pins:
        if not pin.version:
            problems.append(f"`{pin.line}` is not an exact `name==version` pin")
        if not pin.hashes:
            problems.append(f"{pin.name}=={pin.version} has no hash")

    def active(pin: Pin) -> bool:
        return pin.marker is None or pin.marker.evaluate(LINUX_X86_64_PY311)

    by_name: dict[str, list[Pin]] = {}
    for pin in pins:
        by_name.setdefault(pin.name, []).append(pin)
    for name, group in sorted(by_name.items()):
        on_target = [p for p in group if active(p)]
        if len(on_target) > 1:
            versions = ", ".join(p.version for p in on_target)
            problems.append(f"{name} is pinned more than once for Python 3.11 on linux: {versions}")

    for where, req in _requirements(pyproject):
        name = canonicalize_name(req.name)
        if req.marker is not None and not req.marker.evaluate(LINUX_X86_64_PY311 | {"extra": ""}):
            continue
        group = by_name.get(name, [])
        if not group:
            problems.append(f"{req} ({where}) is not in {lock_path.name}: run `just lock`")
        for pin in group:
            if pin.version and not req.specifier.contains(pin.version, prereleases=True):
                problems.append(
                    f"{name}=={pin.version} in {lock_path.name} does not satisfy {req} ({where}): "
                    "run `just lock`"
                )

    # Each pin's `# via` names what needs it; every pin must lead back to pyproject.toml.
    roots = {PROJECT_LABEL.format(name=pyproject.get("project", {}).get("name", "")), TOOLS_LABEL}
    needed: set[str] = set()
    changed = True
    while changed:
        changed = False
        for pin in pins:
            if pin.name in needed:
                continue
            if any(v in roots or canonicalize_name(v) in needed for v in pin.via):
                needed.add(pin.name)
                changed = True
    for pin in pins:
        if pin.name not in needed:
            problems.append(
                f"{pin.name}=={pin.version} is pinned but nothing in {pyproject_path.name} needs it "
                f"(via: {', '.join(pin.via) or 'nothing'}): run `just lock`"
            )
    return problems


def pip_settings(python: str = sys.executable) -> dict[str, str]:
    """This machine's effective pip options: environment over [install] over [global]."""
    listed = subprocess.run(
        [python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    return parse_pip_config(listed)


def parse_pip_config(listed: str) -> dict[str, str]:
    """`pip config list` output (`section.option='value'` lines) to the effective options."""
    ranked: dict[str, tuple[int, str]] = {}
    rank = {"global": 0, "install": 1, ":env:": 2}
    for line in listed.splitlines():
        key, sep, value = line.partition("=")
        section, _, option = key.rpartition(".")
        if not sep or section not in rank:
            continue
        if option not in ranked or ranked[option][0] <= rank[section]:
            ranked[option] = (rank[section], ast.literal_eval(value))
    return {option: value for option, (_, value) in ranked.items()}


def uv_arguments(settings: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """uv options and environment equivalent to pip's index settings.

    pip treats every index as equal and takes the best version from any of them: uv's
    `unsafe-best-match`. The primary index goes first, so where a mirror (extra-index-url,
    find-links) carries the same release, the hashes come from the primary, which lists every
    platform's files rather than only those the mirror copied.
    """
    args: list[str] = ["--index-strategy", "unsafe-best-match"]
    env: dict[str, str] = {}
    if settings.get("no-index", "").lower() in {"1", "true", "yes", "on"}:
        args.append("--no-index")
    primary = settings.get("index-url", "https://pypi.org/simple")
    args += ["--default-index", primary, "--index", primary]
    for url in settings.get("extra-index-url", "").split():
        args += ["--index", url]
    for location in settings.get("find-links", "").split():
        args += ["--find-links", location]
    for host in settings.get("trusted-host", "").split():
        args += ["--allow-insecure-host", host]
    for path in settings.get("constraint", "").split():
        args += ["--constraint", path]
    if settings.get("cert") and "SSL_CERT_FILE" not in os.environ:
        env["SSL_CERT_FILE"] = settings["cert"]
    return args, env


def find_uv() -> str:
    """uv from the running interpreter, else the pinned UV under .venv/lock-tools."""
    try:
        from uv import find_uv_bin

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        pass
    uv = UV_TOOLS / "bin" / "uv"
    wanted = UV.partition("==")[2]
    if (
        not uv.exists()
        or wanted
        not in subprocess.run([str(uv), "--version"], capture_output=True, text=True).stdout.split()
    ):
        print(f"installing {UV} into {UV_TOOLS.relative_to(ROOT)} (only `just lock` uses it)")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--upgrade"]
            + ["--target", str(UV_TOOLS), UV],
            check=True,
        )
    return str(uv)


def _annotations(body: str, roots_file: Path) -> str:
    """uv's `# via` lines with the temporary roots file named and constraint files left out."""
    out: list[str] = []
    lines = body.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith("    # via"):
            out.append(line)
            i += 1
            continue
        via = [line.removeprefix("    # via").strip()]
        i += 1
        while i < len(lines) and lines[i].startswith("    #   "):
            via.append(lines[i].removeprefix("    #   ").strip())
            i += 1
        via = [TOOLS_LABEL if v == f"-r {roots_file}" else v for v in via if v]
        via = [v for v in via if not v.startswith("-c ")]
        if len(via) == 1:
            out.append(f"    # via {via[0]}")
        else:
            out += ["    # via", *(f"    #   {v}" for v in via)]
    return "\n".join(out) + "\n"


def header(pyproject: dict, floor: str) -> str:
    return (
        "# Every package `just setup` installs, at an exact version with its sha256 hashes.\n"
        "# Written by `just lock` (scripts/lock.py: uv pip compile --universal) from\n"
        "# pyproject.toml's dependencies, all its extras, build-system.requires and pip.\n"
        f"# Resolved for Python >={floor} on every platform (environment markers choose);\n"
        "# do not edit: change pyproject.toml and run `just lock`. `just lint` checks it.\n"
        f"{DIGEST_PREFIX}{inputs_digest(pyproject)}\n"
    )


def python_floor(pyproject: dict) -> str:
    from packaging.specifiers import SpecifierSet

    requires = pyproject.get("project", {}).get("requires-python", "")
    floors = [s.version for s in SpecifierSet(requires) if s.operator in {">=", "~=", "=="}]
    if not floors:
        raise LockError(f"requires-python {requires!r} has no lower bound to resolve for")
    return floors[0]


def write_lock(pyproject_path: Path = PYPROJECT, lock_path: Path = LOCK) -> None:
    pyproject = tomllib.loads(pyproject_path.read_text())
    floor = python_floor(pyproject)
    args, env = uv_arguments(pip_settings())
    uv = find_uv()
    build_requires = pyproject.get("build-system", {}).get("requires", [])
    with tempfile.TemporaryDirectory(prefix="lock-") as tmp:
        roots = Path(tmp) / "roots.in"
        roots.write_text("".join(f"{r}\n" for r in (*TOOLS, *build_requires)))
        compiled = Path(tmp) / "compiled.txt"
        command = [uv, "pip", "compile", "--no-config", "--quiet", pyproject_path.name]
        command += [str(roots), "--all-extras", "--universal", "--python-version", floor]
        command += ["--generate-hashes", "--no-header", "--output-file", str(compiled), *args]
        done = subprocess.run(command, cwd=pyproject_path.parent, env=os.environ | env)
        if done.returncode != 0:
            raise LockError(f"uv pip compile exited {done.returncode} (its message is above)")
        body = _annotations(compiled.read_text(), roots)
    text = header(pyproject, floor) + body
    partial = lock_path.with_name(f".{lock_path.name}.tmp")
    partial.write_text(text)
    os.replace(partial, lock_path)
    pins = parse_lock(text)[1]
    print(f"wrote {lock_path.name}: {len(pins)} pins, {sum(len(p.hashes) for p in pins)} hashes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check the lock, write nothing")
    parser.add_argument("--pyproject", type=Path, default=PYPROJECT)
    parser.add_argument("--lock", type=Path, default=LOCK)
    options = parser.parse_args(argv)
    if not options.check:
        try:
            write_lock(options.pyproject, options.lock)
        except LockError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    problems = check(options.pyproject, options.lock)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
