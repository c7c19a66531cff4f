"""requirements.lock agrees with pyproject.toml; scripts/lock.py --check says so when it does not."""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "lock.py"
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"

_spec = importlib.util.spec_from_file_location("scripts_lock", SCRIPT)
lock = importlib.util.module_from_spec(_spec)
sys.modules["scripts_lock"] = lock
_spec.loader.exec_module(lock)


def pins_by_name() -> dict[str, list]:
    pins: dict[str, list] = {}
    for pin in lock.parse_lock(LOCK.read_text())[1]:
        pins.setdefault(pin.name, []).append(pin)
    return pins


def run_check(pyproject: Path = PYPROJECT, lockfile: Path = LOCK) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--pyproject", str(pyproject)]
        + ["--lock", str(lockfile)],
        capture_output=True,
        text=True,
    )


def test_the_committed_lock_agrees_with_pyproject():
    done = run_check()
    assert (done.returncode, done.stderr) == (0, "")


@pytest.mark.parametrize("table", ["dependencies", "train", "dev"])
def test_every_requirement_is_pinned_with_hashes_at_a_version_it_accepts(table):
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    reqs = project[table] if table == "dependencies" else project["optional-dependencies"][table]
    pins = pins_by_name()
    for req in map(Requirement, reqs):
        found = pins.get(canonicalize_name(req.name))
        assert found, f"{req} is not in requirements.lock"
        for pin in found:
            assert req.specifier.contains(pin.version, prereleases=True), (req, pin.version)
            assert pin.hashes and all(h.startswith("sha256:") for h in pin.hashes), pin.name


def test_the_installer_and_build_backend_are_locked_too():
    build = tomllib.loads(PYPROJECT.read_text())["build-system"]["requires"]
    pins = pins_by_name()
    for req in map(Requirement, ["pip", *build]):
        assert any(req.specifier.contains(p.version) for p in pins[canonicalize_name(req.name)])


def test_the_lock_names_no_index_and_no_local_path():
    text = LOCK.read_text()
    assert not re.search(r"--(extra-)?index-url|--find-links|file:|/tmp/|/opt/|/etc/|/home/", text)


def local_index_releases(url: str, name: str) -> list[tuple[str, Version, str]]:
    """(filename, version, sha256) for `name` on a file:// simple index (none there: [])."""
    page = Path(unquote(urlparse(url).path)) / name / "index.html"
    if not page.is_file():
        return []
    found = []
    for filename, digest in re.findall(
        r'href="[^"#]*?([^/"#]+)#sha256=([0-9a-f]{64})"', page.read_text()
    ):
        filename = html.unescape(filename)
        parse = parse_wheel_filename if filename.endswith(".whl") else parse_sdist_filename
        found.append((filename, parse(filename)[1], digest))
    return found


def test_wheels_on_this_machines_file_indexes_have_a_hash_the_lock_accepts():
    # pip may take a pinned release from any configured index: the copy on a local mirror
    # (torch from /opt/pypi-more here) must be byte-identical to one the lock lists.
    settings = lock.pip_settings()
    indexes = [settings.get("index-url", "")] + settings.get("extra-index-url", "").split()
    local = [url for url in indexes if url.startswith("file://")]
    if not local:
        pytest.skip("no file:// index in pip's configuration")
    compared = []
    for name, pins in pins_by_name().items():
        for url in local:
            for filename, version, digest in local_index_releases(url, name):
                for pin in pins:
                    if Version(pin.version) == version:
                        assert f"sha256:{digest}" in pin.hashes, (url, filename)
                        compared.append(filename)
    assert any(f.startswith("torch-") for f in compared), "torch was not compared"


def test_a_disagreeing_pyproject_is_reported_and_fails_the_check(tmp_path):
    text = PYPROJECT.read_text()
    assert '"pyyaml>=6",' in text and '"pytest>=8",' in text
    wrong = text.replace('"pyyaml>=6",', '"pyyaml>=99",\n    "leftpad-nowhere>=1",')
    wrong = wrong.replace('"pytest>=8",', '"pytest<8",')
    (tmp_path / "pyproject.toml").write_text(wrong)
    pyyaml = pins_by_name()["pyyaml"][0].version
    pytest_pin = pins_by_name()["pytest"][0].version

    done = run_check(tmp_path / "pyproject.toml")

    assert done.returncode == 1
    assert "requirements.lock is stale" in done.stderr
    assert f"pyyaml=={pyyaml} in requirements.lock does not satisfy pyyaml>=99" in done.stderr
    assert f"pytest=={pytest_pin} in requirements.lock does not satisfy pytest<8" in done.stderr
    assert "leftpad-nowhere>=1 (dependencies) is not in requirements.lock" in done.stderr


def test_only_the_dependency_tables_count_not_comments_or_tool_settings(tmp_path):
    text = PYPROJECT.read_text().replace("line-length = 100", "line-length = 99")
    (tmp_path / "pyproject.toml").write_text("# a comment\n" + text)
    done = run_check(tmp_path / "pyproject.toml")
    assert (done.returncode, done.stderr) == (0, "")


def test_a_hand_edited_lock_is_reported(tmp_path):
    text = LOCK.read_text()
    tqdm = pins_by_name()["tqdm"][0].version
    # tqdm loses its hashes, pyyaml becomes a range, and a pin nobody needs appears.
    text = re.sub(
        rf"^tqdm=={re.escape(tqdm)} \\\n(    --hash=\S+( \\)?\n)+",
        f"tqdm=={tqdm}\n",
        text,
        flags=re.M,
    )
    text = re.sub(r"^pyyaml==", "pyyaml>=", text, flags=re.M)
    text += "leftpad==1.0 \\\n    --hash=sha256:" + "0" * 64 + "\n"
    (tmp_path / "requirements.lock").write_text(text)

    done = run_check(lockfile=tmp_path / "requirements.lock")

    assert done.returncode == 1
    assert f"tqdm=={tqdm} has no hash" in done.stderr
    assert "is not an exact `name==version` pin" in done.stderr
    assert "leftpad==1.0 is pinned but nothing in pyproject.toml needs it" in done.stderr
    assert "stale" not in done.stderr


def test_two_pins_of_one_package_for_the_same_python_are_reported(tmp_path):
    text = LOCK.read_text() + (
        "tqdm==0.1 \\\n    --hash=sha256:" + "0" * 64 + "\n    # via ai-ratings (pyproject.toml)\n"
    )
    (tmp_path / "requirements.lock").write_text(text)
    done = run_check(lockfile=tmp_path / "requirements.lock")
    assert done.returncode == 1
    assert "tqdm is pinned more than once for Python 3.11 on linux" in done.stderr


def test_a_missing_lock_is_reported(tmp_path):
    done = run_check(lockfile=tmp_path / "requirements.lock")
    assert done.returncode == 1
    assert "requirements.lock is missing: run `just lock`" in done.stderr


def test_pip_settings_reach_uv_with_the_primary_index_first(tmp_path):
    conf = tmp_path / "pip.conf"
    conf.write_text(
        "[global]\nindex-url = https://mirror.invalid/simple\ncert = /ca.pem\n"
        "[install]\nextra-index-url =\n    file:///srv/a/simple\n    file:///srv/b/simple\n"
    )
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k == "PIP_CONFIG_FILE"
    }
    env |= {"PIP_CONFIG_FILE": str(conf), "PIP_FIND_LINKS": "/wheels"}
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout
    settings = lock.parse_pip_config(listed)
    assert settings["index-url"] == "https://mirror.invalid/simple"
    assert settings["find-links"] == "/wheels"

    args, uv_env = lock.uv_arguments(settings | {"constraint": "/c.txt"})

    pairs = list(zip(args[::2], args[1::2], strict=True))
    assert pairs == [
        ("--index-strategy", "unsafe-best-match"),
        ("--default-index", "https://mirror.invalid/simple"),
        ("--index", "https://mirror.invalid/simple"),
        ("--index", "file:///srv/a/simple"),
        ("--index", "file:///srv/b/simple"),
        ("--find-links", "/wheels"),
        ("--constraint", "/c.txt"),
    ]
    assert uv_env == ({} if "SSL_CERT_FILE" in os.environ else {"SSL_CERT_FILE": "/ca.pem"})


def test_annotations_name_the_roots_file_and_drop_constraint_files(tmp_path):
    roots = tmp_path / "roots.in"
    body = (
        "pip==26.3 \\\n    --hash=sha256:ab\n    # via -r " + f"{roots}\n"
        "torch==2.14.1 \\\n    --hash=sha256:cd\n    # via\n"
        "    #   -c /etc/xdg/pip/constraints.txt\n    #   ai-ratings (pyproject.toml)\n"
    )
    assert lock._annotations(body, roots) == (
        "pip==26.3 \\\n    --hash=sha256:ab\n    # via " + f"{lock.TOOLS_LABEL}\n"
        "torch==2.14.1 \\\n    --hash=sha256:cd\n    # via ai-ratings (pyproject.toml)\n"
    )
