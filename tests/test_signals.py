"""docs/faults.md 3: SIGTERM mid-work stops, rolls back, removes temp files and exits 75
within 30 s; the re-run picks up from what was committed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from conftest import AIRATINGS, air_env
from train_fixtures import FAST, make_world, run_status

from jobs import db, paths


def _env(cfg, overrides: dict) -> dict[str, str]:
    """The same environment ``make_cfg`` used, for the job's subprocess."""
    return {**os.environ, **air_env(cfg.database.url, cfg.paths.artifacts_dir.parent, **overrides)}


def _sigterm_when(args: list[str], env: dict[str, str], ready, wait_s: float) -> tuple[int, str]:
    """Start ``airatings <args>``, wait until a JSON log line on stderr satisfies ``ready``,
    send SIGTERM and return (exit code, stdout); the job must be gone within 30 s."""
    proc = subprocess.Popen(
        [AIRATINGS, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + wait_s
    for line in proc.stderr:
        if line.startswith("{") and ready(json.loads(line)):
            break
        assert time.monotonic() < deadline, "the job never reached the point to stop it at"
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 30
    return proc.returncode, out


def test_sigterm_during_training_exits_75_cleanly_and_rerun_resumes(make_cfg):
    overrides = {**FAST, "train__epochs": 6, "train__early_stopping_patience": 10}
    cfg = make_cfg(**overrides)
    db.migrate(cfg)
    world = make_world(cfg, n=200)
    env = _env(cfg, overrides)
    # SIGTERM right after the first completed epoch
    code, out = _sigterm_when(
        ["train", "--json"], env, lambda e: e["event"] == "epoch_finished", wait_s=240
    )
    assert code == 75, out
    assert "received signal" in json.loads(out)["error"]

    run_dir = paths.of(cfg).run(world["model_version"]).root
    assert not [p for p in run_dir.rglob(".tmp-*")], "temp files left behind"
    assert paths.of(cfg).run(world["model_version"]).last_checkpoint.exists()
    # a transient stop does not fail the run
    assert run_status(cfg, world["run_id"]) == ("cached", None)

    again = subprocess.run(
        [AIRATINGS, "train", "--json"], env=env, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr
    resumed = [json.loads(x) for x in again.stderr.splitlines() if '"training_resumed"' in x]
    assert resumed and resumed[0]["from_epoch"] >= 1
    summary = json.loads(again.stdout)
    assert summary["status"] == "trained" and summary["epochs_run"] == 6
    assert run_status(cfg, world["run_id"])[0] == "trained"


def test_sigterm_during_cache_exits_75_and_leaves_only_complete_files(make_cfg, server):
    from cache_fixtures import jpeg, make_exported_run
    from PIL import Image

    overrides = {
        "cache__concurrency": 4,
        "cache__per_host": 4,
        "cache__allowed_private_hosts": f'["127.0.0.1:{server.port}"]',
        "cache__progress_every_s": 0.2,
    }
    cfg = make_cfg(**overrides)
    db.migrate(cfg)
    # 200 slow (150 ms) images at concurrency 4: ~8 s of work, stopped after the first ones.
    urls = [
        server.add(f"sig{i}.jpg", jpeg(160, 90, seed=i)).replace("/img/", "/slow/")
        for i in range(200)
    ]
    run = make_exported_run(cfg, urls)
    env = _env(cfg, overrides)
    code, out = _sigterm_when(
        ["cache", "--run", run.model_version, "--json"],
        env,
        lambda e: e["event"] == "images_progress" and e["done"] >= 8,
        wait_s=120,
    )
    assert code == 75, out

    art = cfg.artifacts_dir
    assert not [p for p in art.rglob(".tmp-*")], "temp files left behind"
    # every file at a final path is a complete, decodable image
    stored = [p for p in (art / "images").rglob("*") if p.is_file()]
    for p in stored:
        with Image.open(p) as im:
            im.load()
    assert not paths.Paths(art, art).run(run.model_version).active_dir.exists()
    with db.connect(cfg) as conn:
        status = conn.execute(
            "select status from airatings.model_training_runs where id = %s", (run.id,)
        ).fetchone()[0]
    assert status == "exported"

    again = subprocess.run(
        [AIRATINGS, "cache", "--run", run.model_version, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["status"] == "cached" and summary["active_rows"] == 200
