"""The Node scorer (clients/node, the app's cron) against Python on a registered model.

A run made by the real train, evaluate and export-onnx jobs (tests/registry_fixtures.py) is
registered with ``jobs.register.run``; tests/node_fixture.py writes what Python says about it
(tensors, raw scores, aiRatings, gate decisions, rejection reasons, the calibration grid), and
``npm test`` in clients/node compares the Node scorer with that (clients/node/test/): the same
tensor within 1e-5, each side's own decoding within 0.05 aiRating with the same gate decisions,
a tampered model refused, bad bytes refused with Python's reason.

Without ``node``/``npm`` the tests skip, or fail when ``CI`` is set. Without
``clients/node/node_modules`` they run ``npm ci --ignore-scripts`` first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from node_fixture import pick_images, write_fixture
from registry_fixtures import registry_for_test, shared_exported_world

from jobs import register as register_job
from jobs import registry

REPO = Path(__file__).resolve().parents[1]
NODE_DIR = REPO / "clients" / "node"
V = "node_v2_2026_03_01"
NODE_MAJOR = 20


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what}, and CI is set: the Node scorer's tests must run in CI")
    pytest.skip(what)


# Node on PATH first; else the one `just setup` put into the venv (scripts/ensure-node.sh)
NODE_PATH = os.pathsep.join([os.environ.get("PATH", ""), str(Path(sys.executable).parent)])


def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for node and npm: PATH with the venv's Node as the fallback."""
    return {**os.environ, "PATH": NODE_PATH, **(extra or {})}


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: int = 600) -> str:
    """``cmd`` in clients/node; its output (stdout and stderr together) whatever it returns."""
    proc = subprocess.run(
        cmd,
        cwd=NODE_DIR,
        env=node_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    return f"$ {' '.join(cmd)}\n(exit {proc.returncode})\n{proc.stdout}"


def _exit_code(output: str) -> int:
    return int(re.search(r"^\(exit (-?\d+)\)$", output, re.M).group(1))


def _count(output: str, what: str) -> int:
    """node --test's closing count (``# pass 23``)."""
    m = re.search(rf"^# {what} (\d+)$", output, re.M)
    assert m, f"no '# {what} N' line in node's output:\n{output}"
    return int(m.group(1))


@pytest.fixture(scope="module")
def npm() -> str:
    node, npm_path = shutil.which("node", path=NODE_PATH), shutil.which("npm", path=NODE_PATH)
    if not node or not npm_path:
        _missing("node or npm is not installed")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    major = int(version.stdout.strip().lstrip("v").split(".")[0])
    if major < NODE_MAJOR:
        _missing(f"node {version.stdout.strip()} is older than {NODE_MAJOR}")
    if not (NODE_DIR / "node_modules").is_dir():
        out = _run([npm_path, "ci", "--ignore-scripts", "--no-audit", "--no-fund"])
        assert _exit_code(out) == 0, out
    return npm_path


@pytest.fixture(scope="module")
def fixture_dir(npm, request, pg_server, tmp_path_factory) -> Path:
    """The fixture of a freshly registered version (its real test originals, the first four
    and the four nearest the threshold, plus the made images and bad files)."""
    base = shared_exported_world(request, pg_server, tmp_path_factory)
    tmp = tmp_path_factory.mktemp("node_scorer")
    with registry_for_test(pg_server, tmp, base) as reg:
        reg.clone(V)
        assert register_job.run(reg.cfg, run_ref=V)["status"] == "registered"
        onnx_path, card = registry.load_verified(reg.cfg, V)
        images = pick_images(reg.cfg, V, first=4, near=4)
        assert len(images) == 8
        write_fixture(
            onnx_path.parent, images, tmp / "fixture", max_pixels=reg.cfg.cache.max_pixels
        )
    return tmp / "fixture"


def _npm_test(npm: str, fixture: Path) -> str:
    return _run([npm, "test"], env={"AIR_NODE_FIXTURE": str(fixture)})


def test_node_scorer_agrees_with_python(npm, fixture_dir):
    out = _npm_test(npm, fixture_dir)
    assert _exit_code(out) == 0, out
    assert _count(out, "fail") == 0 and _count(out, "skipped") == 0, out
    assert _count(out, "pass") >= 20, out
    ref = json.loads((fixture_dir / "reference.json").read_text())
    tensor = re.search(r"air-node: tensor_max_abs_delta_raw=(\S+) images=(\d+)", out)
    assert tensor, out
    assert float(tensor.group(1)) <= 1e-5 and int(tensor.group(2)) == len(ref["images"]), out
    decode = re.search(r"air-node: decode_max_abs_delta_ai_rating=(\S+) images=(\d+).*", out)
    assert decode, out
    assert float(decode.group(1)) <= 0.05 and int(decode.group(2)) == len(ref["images"]), out
    print(tensor.group(0), decode.group(0), sep="\n")  # the numbers, shown with -s or -rA


def test_node_tests_fail_when_python_says_otherwise(npm, fixture_dir, tmp_path):
    """The comparison can fail: a fixture whose Python values are off by a little in each
    kind of check makes exactly those Node tests fail."""
    broken = tmp_path / "fixture"
    shutil.copytree(fixture_dir, broken)
    ref = json.loads((broken / "reference.json").read_text())
    ref["images"][0]["raw_score"] += 1e-4  # 10x the tensor tolerance
    ref["images"][1]["ai_rating"] += 0.06  # just past the decoding tolerance
    ref["calibration_grid"]["ai_rating"][7] += 1e-12  # not numpy.interp's double
    bad = next(r for r in ref["rejects"] if r["name"] == "truncated.png")
    bad["reason"] = "corrupt" if bad["reason"] != "corrupt" else "truncated"
    (broken / "reference.json").write_text(json.dumps(ref))

    out = _npm_test(npm, broken)

    assert _exit_code(out) != 0, out
    assert _count(out, "fail") == 4, out
    for name in (
        "same tensor: raw_score within",
        "own decoding: |delta aiRating|",
        "equals numpy.interp",
        "bad bytes are rejected with Python's reason",
    ):
        assert re.search(rf"^\s*not ok \d+ - {re.escape(name)}", out, re.M), (name, out)
