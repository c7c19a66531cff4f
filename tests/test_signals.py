"""RELIABILITY.md 3: SIGTERM mid-work stops, rolls back, removes temp files and exits 75
within 30 s; the re-run picks up from what was committed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from conftest import AIRATINGS
from train_fixtures import FAST, make_world, run_status

from jobs import db


def _env(cfg, overrides: dict) -> dict[str, str]:
    env = {
        **os.environ,
        "DATABASE_URL": cfg.database.url,
        "AIR_ARTIFACTS_DIR": str(cfg.paths.artifacts_dir),
        "AIR_DATA_DIR": str(cfg.paths.data_dir),
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        env[f"AIR__{section.upper()}__{name.upper()}"] = str(value)
    return env


def test_sigterm_during_training_exits_75_cleanly_and_rerun_resumes(make_cfg):
    overrides = {**FAST, "train__epochs": 6, "train__early_stopping_patience": 10}
    cfg = make_cfg(**overrides)
    db.migrate(cfg)
    world = make_world(cfg, n=200)
    env = _env(cfg, overrides)
    proc = subprocess.Popen(
        [AIRATINGS, "train", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Wait for the first completed epoch (JSON log lines on stderr), then SIGTERM.
    deadline = time.monotonic() + 240
    for line in proc.stderr:
        if '"epoch_finished"' in line:
            break
        assert time.monotonic() < deadline, "no epoch finished in time"
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 30
    assert proc.returncode == 75, out
    assert "received signal" in json.loads(out)["error"]

    run_dir = cfg.artifacts_dir / "runs" / world["model_version"]
    assert not [p for p in run_dir.rglob(".tmp-*")], "temp files left behind"
    assert (run_dir / "last.pt").exists()
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
