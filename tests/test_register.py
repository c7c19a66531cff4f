"""`airatings register`: the write-once model folder (model.onnx, model_card.json, release.env,
configmap.yaml), the registered run row, "already registered", and the bad inputs of issue
[7/11]: other bytes under a registered version, twin registers at once, a register that died
after its files and before its commit, a run that did not pass parity or is not exported.

The run is made once per module by the real train, evaluate and export-onnx jobs
(tests/registry_fixtures.py) and cloned into a fresh database and artifact store per test.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import kubernetes_validate
import psycopg
import pytest
import yaml
from psycopg import sql
from registry_fixtures import registry_for_test, row_of, set_param, shared_exported_world

from jobs import db, paths, registry, runs
from jobs import register as register_job
from jobs.artifacts import owner_tag, sha256_file
from jobs.errors import InputError, TransientError

V = "reg_v2_2026_02_01"


@pytest.fixture(scope="module")
def base(request, pg_server, tmp_path_factory):
    return shared_exported_world(request, pg_server, tmp_path_factory)


@pytest.fixture
def reg(pg_server, tmp_path, base):
    with registry_for_test(pg_server, tmp_path, base) as r:
        yield r


def _files(cfg, version):
    root = paths.of(cfg).model(version).root
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_register_writes_the_model_folder_and_the_row(reg, monkeypatch):
    monkeypatch.setenv("AIR_ACTOR", "ci-bot")
    cfg = reg.cfg
    run_id = reg.clone(V, labels=True)
    exported = paths.of(cfg).run(V)
    onnx_rec = row_of(cfg, V)["params"]["onnx"]

    out = register_job.run(cfg, run_ref=V)

    model_paths = paths.of(cfg).model(V)
    assert out["status"] == "registered" and out["model_version"] == V
    assert _files(cfg, V) == ["configmap.yaml", "model.onnx", "model_card.json", "release.env"]
    # the copy is the exported bytes, recorded by export-onnx; read-only on disk
    sha = onnx_rec["onnx_sha256"]
    assert sha256_file(model_paths.onnx) == sha256_file(exported.onnx) == sha == out["sha256"]
    assert not os.stat(model_paths.onnx).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)

    card = json.loads(model_paths.card.read_text())
    assert card["model_version"] == V and card["sha256"] == sha
    assert card["inputs"] == [
        {"name": "image", "dtype": "uint8", "shape": ["batch", "height", "width", 3]}
    ]
    assert card["outputs"] == [{"name": "raw_score", "dtype": "float32", "shape": ["batch"]}]
    assert card["preprocessing"] == onnx_rec["preprocessing"] and card["preprocessing"]["in_graph"]
    assert card["calibration"] == onnx_rec["calibration"] and len(card["calibration"]["x"]) >= 2
    assert card["threshold_policy"]["rule"] == "aiRating >= threshold"
    assert card["threshold_policy"]["threshold"] == 4.0 == cfg.dataset.good_threshold
    assert card["training_run"]["id"] == run_id and card["training_run"]["trained_at"]
    assert card["dataset"]["hash"] == reg.base_world["dataset_hash"]
    assert card["labels"] == {
        "offered": 3,
        "used": 2,
        "excluded": 1,
        "not_recorded": 0,
        "excluded_by_reason": {"download_failed": 1},
    }
    metrics = json.loads(exported.metrics.read_text())
    assert card["metrics"]["slices"] == metrics["metrics"]
    mae = card["metrics"]["slices"]["all"]["mae"]
    assert mae["status"] == "ok" and mae["ci_low"] <= mae["value"] <= mae["ci_high"]
    assert card["parity"]["passed"] is True and card["parity"]["max_abs_delta_raw"] <= 1e-4
    for lib in ("torch", "torchvision", "numpy", "python"):
        assert card["libraries"]["training"][lib]
    for lib in ("onnx", "onnxruntime", "torch"):
        assert card["libraries"]["export"][lib]

    env = dict(
        line.split("=", 1)
        for line in model_paths.release_env.read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert env == {
        "AI_MODEL_VERSION": V,
        "AI_MODEL_PATH": f"models/{V}/model.onnx",
        "AI_MODEL_SHA256": sha,
        "AI_MODEL_CARD_PATH": f"models/{V}/model_card.json",
        "AI_CAPTURE_THRESHOLD": "4.0",
    }
    assert (cfg.artifacts_dir / env["AI_MODEL_PATH"]).samefile(model_paths.onnx)
    cm = yaml.safe_load(model_paths.configmap.read_text())
    assert cm["apiVersion"] == "v1" and cm["kind"] == "ConfigMap"
    assert cm["metadata"]["name"] == "airatings-model" and cm["data"] == env
    # what kubectl's schema validation says (strict: no unknown fields)
    kubernetes_validate.validate(cm, "1.30.0", strict=True)

    row = row_of(cfg, V)
    assert row["status"] == "registered" and row["artifact_sha256"] == sha
    assert row["artifact_path"] == f"models/{V}/model.onnx"
    rec = row["params"]["register"]
    assert rec["card_sha256"] == sha256_file(model_paths.card)
    assert rec["metrics"]["mae"] == mae["value"] and rec["registered_by"] == "ci-bot"
    assert rec["files"]["configmap"]["sha256"] == sha256_file(model_paths.configmap)

    # the loader hands out the verified file and card
    path, loaded = registry.load_verified(cfg, V)
    assert path == model_paths.onnx and loaded == card

    # the same bytes again: already registered (exit 0), nothing rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in model_paths.root.iterdir()}
    again = register_job.run(cfg, run_ref=V)
    assert again["status"] == "already_registered" and again["sha256"] == sha
    assert {p: p.stat().st_mtime_ns for p in model_paths.root.iterdir()} == mtimes
    assert row_of(cfg, V)["params"]["register"] == rec


def test_register_refuses_runs_that_are_not_exported_or_failed_parity(reg):
    cfg = reg.cfg
    reg.clone("reg_evaluated_only", status="evaluated")
    with pytest.raises(InputError, match="needs 'onnx_exported' first"):
        register_job.run(cfg, run_ref="reg_evaluated_only")

    run_id = reg.clone("reg_parity_failed")
    set_param(cfg, run_id, ["onnx", "parity", "passed"], False)
    with pytest.raises(
        InputError, match="did not pass the ONNX parity gate: nothing is registered"
    ):
        register_job.run(cfg, run_ref="reg_parity_failed")

    # parity.json is checked against the sha256 export-onnx recorded
    reg.clone("reg_parity_edited")
    parity = paths.of(cfg).run("reg_parity_edited").parity
    doc = json.loads(parity.read_text())
    doc["parity"]["passed"] = True
    doc["parity"]["tolerance"] = 1.0
    parity.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="is not the file export-onnx recorded"):
        register_job.run(cfg, run_ref="reg_parity_edited")

    # a changed export: not the bytes export-onnx checked
    reg.clone("reg_onnx_edited")
    exported = paths.of(cfg).run("reg_onnx_edited").onnx
    exported.write_bytes(exported.read_bytes() + b"\0")
    with pytest.raises(InputError, match="is not the .* export-onnx recorded; refusing"):
        register_job.run(cfg, run_ref="reg_onnx_edited")

    for version in (
        "reg_evaluated_only",
        "reg_parity_failed",
        "reg_parity_edited",
        "reg_onnx_edited",
    ):
        assert _files(cfg, version) == []
        assert row_of(cfg, version)["status"] in ("evaluated", "onnx_exported")
        with pytest.raises(InputError, match="is not registered"):
            registry.load_verified(cfg, version)


def test_force_needs_promote_and_a_reason_before_anything_is_written(reg):
    cfg = reg.cfg
    reg.clone(V)
    with pytest.raises(InputError, match="--force only applies to --promote"):
        register_job.run(cfg, run_ref=V, force=True, reason="because")
    with pytest.raises(InputError, match="--force needs --reason TEXT"):
        register_job.run(cfg, run_ref=V, promote=True, force=True, reason="   ")
    assert _files(cfg, V) == [] and row_of(cfg, V)["status"] == "onnx_exported"


def test_a_registered_version_refuses_other_bytes(reg):
    cfg = reg.cfg
    reg.clone(V)
    register_job.run(cfg, run_ref=V)
    exported = paths.of(cfg).run(V).onnx
    exported.write_bytes(exported.read_bytes()[:-1] + b"\x01")
    with pytest.raises(InputError, match="is not the model registered as .*immutable"):
        register_job.run(cfg, run_ref=V)
    # the run's export gone: the registered copy is the record, still verified
    exported.unlink()
    assert register_job.run(cfg, run_ref=V)["status"] == "already_registered"


def test_a_tampered_registered_model_is_refused_by_every_loader(reg):
    cfg = reg.cfg
    reg.clone(V)
    register_job.run(cfg, run_ref=V)
    model = paths.of(cfg).model(V).onnx
    good = model.read_bytes()
    model.chmod(0o644)
    model.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    for load in (registry.load_verified, registry.read_verified):
        with pytest.raises(InputError, match="does not match the registered .*refusing to load"):
            load(cfg, V)
    with pytest.raises(InputError, match="does not match the registered"):
        register_job.run(cfg, run_ref=V)  # not "already registered"
    with pytest.raises(InputError, match="does not match the registered"):
        registry.promote(cfg, V)
    assert "FAILED" in registry.show(cfg, V)["integrity"]

    # the card is checked too (its sha256 is in the database)
    model.write_bytes(good)
    assert registry.read_verified(cfg, V)[0] == good
    card = paths.of(cfg).model(V).card
    card.chmod(0o644)
    card.write_text(card.read_text().replace('"threshold": 4.0', '"threshold": 2.0'))
    with pytest.raises(InputError, match="model_card.json: sha256 .* does not match the recorded"):
        registry.load_verified(cfg, V)


def test_twin_registers_at_once_make_one_row_and_one_set_of_files(reg):
    cfg = reg.cfg
    reg.clone(V)
    n = 3
    barrier = threading.Barrier(n)
    results: list[dict] = []
    errors: list[BaseException] = []

    def one() -> None:
        barrier.wait()
        try:
            results.append(register_job.run(cfg, run_ref=V))
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    statuses = sorted(r["status"] for r in results)
    assert statuses.count("registered") == 1, statuses
    assert set(statuses) <= {"registered", "skipped", "already_registered"}
    assert _files(cfg, V) == ["configmap.yaml", "model.onnx", "model_card.json", "release.env"]
    with db.connect(cfg) as conn:
        rows = conn.execute(
            sql.SQL("select status from {} where model_version = %s").format(
                runs.table(cfg, "model_training_runs")
            ),
            (V,),
        ).fetchall()
    assert rows == [("registered",)]
    registry.load_verified(cfg, V)


def test_a_register_that_dies_before_its_commit_leaves_complete_files_and_reruns(
    pg_server, tmp_path, base
):
    """The run row is locked by someone else, so the register's final transaction times out
    (exit 75) after its files are in place: they are complete, nothing registers them, and
    the re-run commits the same bytes. A temp file a killed writer left is swept."""
    with registry_for_test(pg_server, tmp_path, base, database__lock_timeout_s=0.5) as reg:
        cfg = reg.cfg
        run_id = reg.clone(V)
        model_paths = paths.of(cfg).model(V)
        dead = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"],
            check=True,
            capture_output=True,
            text=True,
        )
        model_paths.root.mkdir(parents=True)
        leftover = (
            model_paths.root / f".tmp-h{owner_tag()}-p{int(dead.stdout)}-0123456789ab-model.onnx"
        )
        leftover.write_bytes(b"half a model")

        with psycopg.connect(db.conninfo(cfg)) as holder:
            holder.execute(
                sql.SQL("select 1 from {} where id = %s for update").format(
                    runs.table(cfg, "model_training_runs")
                ),
                (run_id,),
            )
            with pytest.raises(TransientError, match="lock_timeout"):
                register_job.run(cfg, run_ref=V)
        assert not leftover.exists()
        assert _files(cfg, V) == ["configmap.yaml", "model.onnx", "model_card.json", "release.env"]
        sha = row_of(cfg, V)["params"]["onnx"]["onnx_sha256"]
        assert sha256_file(model_paths.onnx) == sha
        row = row_of(cfg, V)
        assert row["status"] == "onnx_exported" and row["artifact_sha256"] is None
        with pytest.raises(InputError, match="is not registered"):
            registry.load_verified(cfg, V)

        out = register_job.run(cfg, run_ref=V)
        assert out["status"] == "registered" and sha256_file(model_paths.onnx) == sha
        registry.load_verified(cfg, V)


def test_a_register_killed_before_its_commit_is_completed_by_the_next_run(reg):
    """SIGKILL while the register waits for its final transaction (the run row is locked by
    the test, so it cannot have committed): the files at their final names are complete,
    nothing registers them, and the next run registers the same bytes."""
    cfg = reg.cfg
    run_id = reg.clone(V)
    model_paths = paths.of(cfg).model(V)
    code = (
        "import sys; from jobs.config import Config; from jobs import register as register_job; "
        "register_job.run(Config.model_validate_json(sys.argv[1]), run_ref=sys.argv[2])"
    )
    waiting = cfg.model_copy(
        update={"database": cfg.database.model_copy(update={"lock_timeout_s": 0.0})}
    )
    with psycopg.connect(db.conninfo(cfg)) as holder:
        holder.execute(
            sql.SQL("select 1 from {} where id = %s for update").format(
                runs.table(cfg, "model_training_runs")
            ),
            (run_id,),
        )
        child = subprocess.Popen([sys.executable, "-c", code, waiting.model_dump_json(), V])
        try:
            deadline = time.monotonic() + 300
            while not model_paths.configmap.exists():  # the last file it writes
                assert child.poll() is None, "register exited before writing its files"
                assert time.monotonic() < deadline, "register never wrote its files"
                time.sleep(0.2)
        finally:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    assert _files(cfg, V) == ["configmap.yaml", "model.onnx", "model_card.json", "release.env"]
    row = row_of(cfg, V)
    assert row["status"] == "onnx_exported" and row["artifact_sha256"] is None
    assert sha256_file(model_paths.onnx) == row["params"]["onnx"]["onnx_sha256"]

    # the killed process's advisory lock goes with its session
    with db.connect(cfg) as conn:
        deadline = time.monotonic() + 60
        while conn.execute("select count(*) from pg_locks where locktype = 'advisory'").fetchone()[
            0
        ]:
            assert time.monotonic() < deadline, "the killed register's lock was never released"
            time.sleep(0.1)
    assert register_job.run(cfg, run_ref=V)["status"] == "registered"
    registry.load_verified(cfg, V)


def test_an_unregistered_leftover_with_other_bytes_is_refused_naming_the_folder(reg):
    cfg = reg.cfg
    reg.clone(V)
    model_paths = paths.of(cfg).model(V)
    model_paths.root.mkdir(parents=True)
    model_paths.card.write_text("{}")  # what an older, unfinished registration left
    with pytest.raises(InputError, match=r"does not register .*remove .*re-run"):
        register_job.run(cfg, run_ref=V)
    assert row_of(cfg, V)["status"] == "onnx_exported"
    model_paths.card.unlink()
    (model_paths.onnx).chmod(0o644)
    assert register_job.run(cfg, run_ref=V)["status"] == "registered"


@pytest.mark.parametrize("location", ["weights.bin", "../../outside.bin"])
def test_a_model_with_external_data_is_not_registered(reg, location):
    """A self-contained file is what gets registered: an export whose tensors live in
    another file (inside its folder or out of it) is refused."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    cfg = reg.cfg
    run_id = reg.clone(V)
    run_paths = paths.of(cfg).run(V)
    weight = numpy_helper.from_array(np.ones((1,), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save_model(
        model, run_paths.onnx, save_as_external_data=True, location="weights.bin", size_threshold=0
    )
    if location != "weights.bin":  # onnx will not write a '..' location; a foreign file may say it
        (run_paths.root / "weights.bin").rename(cfg.artifacts_dir / "outside.bin")
        saved = onnx.load(run_paths.onnx, load_external_data=False)
        (entry,) = [e for e in saved.graph.initializer[0].external_data if e.key == "location"]
        entry.value = location
        run_paths.onnx.write_bytes(saved.SerializeToString())
    set_param(cfg, run_id, ["onnx", "onnx_sha256"], sha256_file(run_paths.onnx))
    with pytest.raises(InputError, match=r"tensors \['w'\] keep their data outside the file"):
        register_job.run(cfg, run_ref=V)
    assert _files(cfg, V) == [] and row_of(cfg, V)["status"] == "onnx_exported"
