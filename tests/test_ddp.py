"""`airatings train` under torchrun on CPU (gloo, 2 processes): the same training as one
process with the same global batch, a killed rank fails the run with exit 75 and the re-run
resumes where an uninterrupted run ends, a global batch the ranks cannot share is exit 2.

resnet18 (no dropout: dropout draws per process, so with it two ranks cannot reproduce one
process's masks) at 32 px on 48 training rows, global batch 8 (4 per rank), 2 epochs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import air_env
from train_fixtures import (
    FAST,
    insert_run,
    make_world,
    run_status,
    world_rows,
    write_images,
    write_manifests,
)

import jobs.train
from jobs import db, paths
from jobs.errors import ConfigError
from jobs.train import data as train_data
from jobs.train import engine
from jobs.train import model as train_model

DDP = {
    **FAST,
    "train__backbone": "resnet18",
    "train__input_size": 32,
    "train__batch_size": 8,
    "train__threads": 1,
    "train__epochs": 2,
    "train__lr": 3e-4,
}
TRAIN_ROWS, VAL_ROWS = 8, 15  # one global batch of 8 an epoch; 15 val rows: uneven shards
# Tolerances (2 ranks vs 1 process, same global batches, 2 steps). The ranks sum the loss and
# the BatchNorm statistics in another order than one process does, so floats differ in the
# last bits; measured here: history values within 3e-5 relative, the weights' difference
# 8e-4 of how far training moved them. (AdamW divides each step by the gradient's own size,
# so after more steps the last-bit differences of near-zero gradients grow to percent level:
# 2 steps keep the comparison tight.)
HISTORY_RTOL = 3e-4
WEIGHTS_RTOL = 1e-2


def _rows():
    rows = world_rows(TRAIN_ROWS + VAL_ROWS + 8, seed=3)
    for i, r in enumerate(rows):
        r["split"] = "train" if i < TRAIN_ROWS else "val" if i < TRAIN_ROWS + VAL_ROWS else "test"
    return rows


def _env(database_url, tmp_path, **overrides):
    env = {**os.environ, **air_env(database_url, tmp_path, **{**DDP, **overrides})}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(env, *script, launcher="torch.distributed.run"):
    """2 ranks on this machine (torchrun picks a free port: --standalone). No ``--run``: torchrun's
    argparse takes it, even after the script, for an ambiguous abbreviation of its --run-path
    (the runs here are each the latest when trained)."""
    return subprocess.run(
        [sys.executable, "-m", launcher, "--standalone", "--nproc-per-node", "2", *script],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def _summaries(r):
    """The JSON summaries the ranks printed: {rank: summary}."""
    out = {}
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            s = json.loads(line)
            out[s.get("rank", 0)] = s
    return out


def _history(cfg, version):
    return train_model.load_weights_only(paths.of(cfg).run(version).last_checkpoint)["history"]


def _weights(cfg, version):
    return train_model.load_weights_only(paths.of(cfg).run(version).last_checkpoint)["model"]


def _initial_weights(cfg, version):
    """What engine.main starts from (same seed, same sequence)."""
    from jobs.runs import get_run

    with db.connect(cfg) as conn:
        run = get_run(conn, cfg, version)
    engine.seed_everything(cfg.train.seed)
    spec = {"backbone": "resnet18", "target": "regression", "input_size": 32}
    train = train_data.load_split(cfg, run, "train")
    model, _ = engine.build_model(cfg, spec, train, resuming=False)
    return model.state_dict()


def _relative_distance(a, b, start):
    """||a - b|| / ||a - start|| over the float tensors: how far apart two runs ended, as a
    share of how far training moved the weights."""
    keys = [k for k in a if a[k].is_floating_point() and "running" not in k]
    diff = torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in keys))
    moved = torch.sqrt(sum(((a[k] - start[k]) ** 2).sum() for k in keys))
    assert moved > 0
    return float(diff / moved)


KILL_RANK_1_AFTER_EPOCH_1 = """
import os, signal, sys
import typer
import jobs.train
from jobs import cli

def killed_after_epoch_1(epoch, row):
    if epoch == 1 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)  # rank 1 dies; last.pt of epoch 1 is saved

def train(cfg, **kw):
    return jobs.train.run(cfg, epoch_callback=killed_after_epoch_1, **kw)

try:
    cli.run_job("train", train, None, True, run_ref=sys.argv[1])
except typer.Exit as e:
    sys.exit(e.exit_code)
"""


def test_two_ranks_train_as_one_process_and_a_killed_rank_resumes(make_cfg, database_url, tmp_path):
    cfg = make_cfg(**DDP)
    db.migrate(cfg)
    rows = _rows()
    write_images(cfg, rows, seed=3)
    one = make_world(cfg, rows=rows, model_version="ddp_one")
    out1 = jobs.train.run(cfg, run_ref=one["run_id"])  # 1 process, global batch 8
    assert out1["status"] == "trained" and "distributed" not in out1

    # the same data and config, 2 ranks under plain torchrun running the airatings CLI
    write_manifests(cfg, "ddp_two", rows)
    two_id = insert_run(cfg, "ddp_two", one["dataset_hash"])
    env = _env(database_url, tmp_path)
    r = _torchrun(env, "-m", "jobs.cli", "train", "--json")  # the latest run
    assert r.returncode == 0, r.stderr[-4000:]
    summaries = _summaries(r)
    out2 = summaries[0]
    assert set(summaries) == {0, 1} and summaries[1]["model_version"] == "ddp_two"
    assert out2["status"] == "trained" and out2["epochs_run"] == 2
    assert out2["distributed"] == {
        "world_size": 2,
        "backend": "gloo",
        "per_rank_batch_size": 4,
        "global_batch_size": 8,
    }
    # the same provenance as one process
    for key in ("config_hash", "dataset_hash", "training_data_hash", "spec", "metric"):
        assert out2[key] == out1[key], key
    assert run_status(cfg, two_id)[0] == "trained"
    with db.connect(cfg) as conn:
        from psycopg import sql

        from jobs.runs import table

        params = conn.execute(
            sql.SQL("select params_json from {} where id = %s").format(
                table(cfg, "model_training_runs")
            ),
            (two_id,),
        ).fetchone()[0]
    assert params["train"]["best_weights_sha256"] == out2["best_weights_sha256"]

    # the same training, step for step: history and weights within the stated tolerance
    h1, h2 = _history(cfg, "ddp_one"), _history(cfg, "ddp_two")
    assert [h["epoch"] for h in h2] == [1, 2]
    for a, b in zip(h1, h2, strict=True):
        assert a["train_images"] == b["train_images"] == TRAIN_ROWS
        for k in ("train_loss", "val_loss", "val_mae", "val_rmse", "lr"):
            assert b[k] == pytest.approx(a[k], rel=HISTORY_RTOL), k
    start = _initial_weights(cfg, "ddp_one")
    w1, w2 = _weights(cfg, "ddp_one"), _weights(cfg, "ddp_two")
    assert w1.keys() == w2.keys()
    distance = _relative_distance(w1, w2, start)
    print(f"2 ranks vs 1 process: weights {distance:.2e} of the distance travelled")
    assert distance < WEIGHTS_RTOL, distance
    # a checkpoint written by 2 ranks (SyncBatchNorm) loads into the plain network
    model, _ = train_model.model_from_checkpoint(paths.of(cfg).run("ddp_two").best_checkpoint)
    assert not any("Sync" in type(m).__name__ for m in model.modules())

    # rank 1 killed after epoch 1: the run fails with 75, not marked failed, last.pt kept
    write_manifests(cfg, "ddp_kill", rows)
    kill_id = insert_run(cfg, "ddp_kill", one["dataset_hash"])
    script = tmp_path / "kill_rank_1.py"
    script.write_text(textwrap.dedent(KILL_RANK_1_AFTER_EPOCH_1))
    r = _torchrun(env, str(script), "latest", launcher="jobs.distributed")
    assert r.returncode == 75, r.stderr[-4000:]
    assert "exit code -9" in r.stderr
    assert run_status(cfg, kill_id)[0] == "cached"
    assert (
        train_model.load_weights_only(paths.of(cfg).run("ddp_kill").last_checkpoint)["epoch"] == 1
    )

    # the re-run resumes on both ranks and ends where the uninterrupted 2-rank run ended
    r = _torchrun(env, "-m", "jobs.cli", "train", "--json", launcher="jobs.distributed")
    assert r.returncode == 0, r.stderr[-4000:]
    resumed = _summaries(r)[0]
    assert resumed["resumed_from_epoch"] == 1 and resumed["epochs_run"] == 2
    assert resumed["last_weights_sha256"] == out2["last_weights_sha256"]
    assert run_status(cfg, kill_id)[0] == "trained"


def test_a_global_batch_the_ranks_cannot_share_is_exit_2(make_cfg, database_url, tmp_path):
    cfg = make_cfg(**{**DDP, "train__batch_size": 7})
    db.migrate(cfg)
    world = make_world(cfg, n=20)
    env = _env(database_url, tmp_path, train__batch_size=7)
    r = _torchrun(env, "-m", "jobs.cli", "train", "--json", launcher="jobs.distributed")
    assert r.returncode == 2, r.stderr[-4000:]
    errors = [s["error"] for s in _summaries(r).values()]
    assert errors and all("train.batch_size 7" in e and "not divisible" in e for e in errors)
    assert run_status(cfg, world["run_id"])[0] == "cached"
    assert not paths.of(cfg).run(world["model_version"]).root.joinpath("config.yaml").exists()


def test_rank_env_is_read_and_one_process_never_joins_a_group(monkeypatch, make_cfg):
    from jobs import distributed

    assert distributed.from_env({}) is None
    assert distributed.from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    d = distributed.from_env(
        {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    )
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.is_main) == (
        3,
        4,
        1,
        2,
        False,
    )
    with pytest.raises(ConfigError, match="RANK"):
        distributed.from_env({"WORLD_SIZE": "2"})
    # in-process: the batch check comes before any process group or database access
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="not divisible by the 2 ranks"):
        jobs.train.run(make_cfg(**{**DDP, "train__batch_size": 9}))
    assert not torch.distributed.is_initialized()
    assert distributed.exit_code_for([-9]) == 75 and distributed.exit_code_for([75, 2]) == 2


def test_torchrun_passes_run_ref_through_but_not_run():
    """torchrun's argument parser matches "--run" to its own --run-path even after the script
    (argparse prefix matching); "--run-ref", the CLI's other name for the option, reaches the
    job."""
    from torch.distributed.run import get_args_parser
    from typer.testing import CliRunner

    from jobs import cli

    parser = get_args_parser()
    args = parser.parse_args(["--nproc-per-node", "2", "-m", "jobs.cli", "train", "--run-ref", "x"])
    assert args.training_script_args == ["train", "--run-ref", "x"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--nproc-per-node", "2", "-m", "jobs.cli", "train", "--run", "x"])
    help_text = CliRunner().invoke(cli.app, ["train", "--help"]).output
    assert "--run-ref" in help_text
