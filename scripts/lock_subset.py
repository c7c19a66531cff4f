"""The part of requirements.lock that pyproject.toml's core ``dependencies`` (and the extras
named) need: an image's share of the one lock.

    python scripts/lock_subset.py requirements.lock pyproject.toml > runtime.lock
    python scripts/lock_subset.py requirements.lock pyproject.toml train > train.lock

Walks the lock's ``# via`` annotations (uv writes each package's direct dependents): a pin is
kept when it is a core dependency or a package kept needs it, transitively. Each kept pin is
copied whole, hashes and markers included, so ``pip install --require-hashes --no-deps -r``
installs the runtime image (docker/Dockerfile, target ``runtime``) from the same lock as
everything else: no torch, torchvision, onnxsim or dev tools; the train image adds the ``train``
extra, still without dev tools.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==")


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def blocks(text: str) -> list[tuple[str, list[str], list[str]]]:
    """(name, the pin's lines, its direct dependents) per pin of the lock."""
    out: list[tuple[str, list[str], list[str]]] = []
    for line in text.splitlines():
        m = _NAME.match(line)
        if m:
            out.append((canon(m.group(1)), [line], []))
            continue
        if not out or not line.startswith("    "):
            continue
        name, lines, via = out[-1]
        stripped = line.strip()
        if stripped.startswith("--hash") or (
            lines[-1].endswith("\\") and not stripped.startswith("#")
        ):
            lines.append(line)
        elif stripped.startswith("# via "):
            via.append(stripped.removeprefix("# via ").strip())
        elif stripped.startswith("#   "):
            via.append(stripped.removeprefix("#").strip())
    return out


def subset(lock_text: str, pyproject: dict, extras: tuple[str, ...] = ()) -> str:
    optional = pyproject["project"].get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"no such extra in pyproject.toml: {unknown}; have {sorted(optional)}")
    roots = [dep for e in extras for dep in optional[e]]
    core = {canon(_NAME.match(d + "==").group(1)) if "==" not in d else canon(d.split("==")[0])
            for d in (re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0]
                      for dep in [*pyproject["project"]["dependencies"], *roots,
                                  *pyproject["build-system"]["requires"]])}  # fmt: skip
    pins = blocks(lock_text)
    parents = {name: {canon(v.split(" ")[0]) for v in via} for name, _, via in pins}
    keep = set(core)
    changed = True
    while changed:
        changed = False
        for name, ps in parents.items():
            if name not in keep and ps & keep:
                keep.add(name)
                changed = True
    missing = core - {n for n, _, _ in pins}
    if missing:
        raise SystemExit(f"core dependencies not in the lock: {sorted(missing)}; run `just lock`")
    what = "core dependencies" + "".join(f" + [{e}]" for e in extras)
    header = f"# The subset of requirements.lock (scripts/lock_subset.py): {what} only.\n"
    return header + "".join("\n".join(lines) + "\n" for name, lines, _ in pins if name in keep)


def main() -> None:
    lock, project, *extras = sys.argv[1:]
    pyproject = tomllib.loads(Path(project).read_text())
    sys.stdout.write(subset(Path(lock).read_text(), pyproject, tuple(extras)))


if __name__ == "__main__":
    main()
