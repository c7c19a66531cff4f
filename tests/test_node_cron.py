"""The app's cron, end to end (the seed's step 10): clients/node/examples/update-windy.ts reads
new snapshots from PostgreSQL, fetches each image from a loopback HTTP server, scores it with
aiScoring.ts, writes the inference rows and the webcams' AI fields and applies the capture
gate, under a login holding only ``airatings_score``; a re-run writes nothing new; its results
agree with `airatings score` on the same snapshots.

Without ``node``/``npm`` the test skips, or fails when ``CI`` is set (test_node_scorer.py's
``npm`` fixture, which also installs clients/node with ``npm ci --ignore-scripts``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from urllib.parse import quote

import pytest
from cache_fixtures import http_server, server  # noqa: F401 - fixtures
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from registry_fixtures import shared_exported_world
from score_fixtures import scoring_world
from test_node_scorer import NODE_DIR, NODE_PATH, _exit_code, _run, node_env, npm  # noqa: F401 - npm: fixture

from jobs import db, paths, score

# |delta aiRating| allowed between the two scorers on one image: each decodes with its own
# library (sharp / Pillow), the graph is the same (clients/node/test measures the real gap).
TOLERANCE_AI = 0.05
FAULTS = {"http_404": 1, "http_503": 1, "missing_url": 1, "not_an_image": 1, "truncated": 1}


@pytest.fixture(scope="module")
def base(request, pg_server, tmp_path_factory):
    return shared_exported_world(request, pg_server, tmp_path_factory)


@pytest.fixture
def world(pg_server, tmp_path, base, server):  # noqa: F811
    with scoring_world(pg_server, tmp_path, base, server) as w:
        yield w


@pytest.fixture(scope="module")
def built(npm):  # noqa: F811
    out = _run([npm, "run", "build"])
    assert _exit_code(out) == 0, out
    script = NODE_DIR / "dist" / "examples" / "update-windy.js"
    assert script.is_file(), out
    return script


def node_url(libpq: str) -> str:
    """node-postgres wants a URL; the embedded server listens on a socket directory."""
    p = conninfo_to_dict(libpq)
    query = f"?host={quote(p['host'])}" if p.get("host", "").startswith("/") else ""
    host = "" if query else p.get("host", "localhost")
    port = f":{p['port']}" if p.get("port") and not query else ""
    if query and p.get("port"):
        query += f"&port={p['port']}"
    return f"postgresql://{quote(p['user'])}@{host}{port}/{quote(p['dbname'])}{query}"


def run_cron(world, script, **env):
    proc = subprocess.run(
        [shutil.which("node", path=NODE_PATH), str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env=node_env(
            {
                "DATABASE_URL": node_url(world.scorer_url),
                "AI_MODEL_DIR": str(paths.of(world.cfg).model(world.version).root),
                "AIRATINGS_SCHEMA": world.cfg.database.ml_schema,
                "APP_SCHEMA": world.cfg.database.app_schema,
                **env,
            }
        ),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_the_node_cron_scores_writes_and_gates_like_airatings_score(world, built):
    good = sorted(s for s, k in world.kinds.items() if k == "good")
    out = run_cron(world, built)
    assert out["modelVersion"] == world.version
    assert out["scored"] == len(good) == 12 and out["skipped"] == 0
    assert out["failedByReason"] == FAULTS
    rows = world.inferences()
    assert sorted(rows) == good  # the 3-day-old snapshot is outside the 24 h window
    threshold = out["threshold"]
    for sid, (_, webcam, version, _raw, ai, gate) in rows.items():
        assert webcam == world.webcam_of[sid] and version == world.version
        assert gate == (ai >= threshold)
    assert sorted(out["captured"]) == sorted(s for s, r in rows.items() if r[5])
    # the webcams: their newest scored snapshot's aiRating and the version
    for w, (ai, version) in world.webcams().items():
        newest = max((s for s in good if world.webcam_of[s] == w), key=world.captured.get)
        assert version == world.version and ai == pytest.approx(rows[newest][4])
    # independent of both scorers: the verified model in onnxruntime on Pillow's decode
    expected = world.expected()
    for sid, r in rows.items():
        assert abs(r[4] - expected[sid][1]) <= TOLERANCE_AI, (sid, r[4], expected[sid])

    # a re-run writes nothing new (only the transient 503 is tried again)
    again = run_cron(world, built)
    assert again["scored"] == 0 and again["failedByReason"] == {"http_503": 1}
    assert world.inferences() == rows

    # the same snapshots through `airatings score` (as the scorer's login): the same rows
    with db.connect(world.cfg) as conn:
        conn.execute(
            sql.SQL("delete from {} where model_version = %s").format(
                world.app("snapshot_ai_inferences")
            ),
            (world.version,),
        )
    py = score.run(world.scorer_cfg, model=world.version)
    assert py["scored"] == len(good) and py["threshold"] == threshold
    py_rows = world.inferences()
    assert sorted(py_rows) == good
    deltas = {s: abs(py_rows[s][4] - rows[s][4]) for s in good}
    assert max(deltas.values()) <= TOLERANCE_AI, deltas
    band = max(deltas.values())
    for s in good:
        if abs(py_rows[s][4] - threshold) > band:  # outside the measured band: same decision
            assert py_rows[s][5] == rows[s][5], (s, py_rows[s], rows[s])


def test_the_node_cron_refuses_a_tampered_model_and_writes_nothing(world, built):
    onnx = paths.of(world.cfg).model(world.version).onnx
    data = bytearray(onnx.read_bytes())
    data[len(data) // 3] ^= 0x01
    os.chmod(onnx, 0o644)
    onnx.write_bytes(bytes(data))
    proc = subprocess.run(
        [shutil.which("node", path=NODE_PATH), str(built)],
        capture_output=True,
        text=True,
        timeout=120,
        env=node_env(
            {"DATABASE_URL": node_url(world.scorer_url), "AI_MODEL_DIR": str(onnx.parent)}
        ),
    )
    assert proc.returncode == 2 and "sha256" in proc.stderr, proc.stderr
    assert world.inferences() == {}
