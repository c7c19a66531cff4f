"""`airatings train` on a tiny learnable world (64x64 JPEGs, CPU, random init, 2 epochs)."""

from __future__ import annotations

import csv
import math
import os
import pickle

import numpy as np
import pytest
import torch
from psycopg import sql
from train_fixtures import (
    FAST,
    insert_run,
    make_world,
    recache,
    run_status,
    write_manifests,
)

import jobs.train
from jobs import db, paths
from jobs.errors import InputError
from jobs.runs import get_run, table
from jobs.train import data as train_data
from jobs.train import engine
from jobs.train import model as train_model


class Stop(KeyboardInterrupt):
    """Stands in for the kill: raised right after an epoch's checkpoint was saved."""


def stop_after(n: int):
    def cb(epoch, row):
        if epoch >= n:
            raise Stop(f"killed after epoch {epoch}")

    return cb


@pytest.fixture
def fast_cfg(make_cfg):
    c = make_cfg(**FAST)
    db.migrate(c)
    return c


def _history(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_trains_resumes_after_kill_and_reproduces_weights(fast_cfg):
    cfg = fast_cfg
    world = make_world(cfg, model_version="test_v2_2026_01_01")
    out = jobs.train.run(cfg, run_ref=world["run_id"])

    assert out["status"] == "trained" and out["epochs_run"] == 2 and out["metric"] == "val_mae"
    run_paths = paths.of(cfg).run("test_v2_2026_01_01")
    run_dir = run_paths.root
    for path in (run_paths.best_checkpoint, run_paths.last_checkpoint, run_paths.history):
        assert path.is_file(), path
    assert (run_dir / "config.yaml").is_file()
    hist = _history(run_paths.history)
    assert [int(r["epoch"]) for r in hist] == [1, 2]
    assert float(hist[1]["train_loss"]) < float(hist[0]["train_loss"])  # the loss falls
    assert all(float(r["img_per_s"]) > 0 and r["val_mae"] for r in hist)
    assert run_status(cfg, world["run_id"])[0] == "trained"
    with db.connect(cfg) as conn:
        params, trained_at = conn.execute(
            sql.SQL("select params_json, trained_at from {} where id = %s").format(
                table(cfg, "model_training_runs")
            ),
            (world["run_id"],),
        ).fetchone()
    assert trained_at is not None
    assert params["train"]["library_versions"]["torch"] == torch.__version__
    assert params["train"]["best_weights_sha256"] == out["best_weights_sha256"]
    ckpt = train_model.load_weights_only(run_paths.best_checkpoint)
    assert ckpt["dataset_hash"] == world["dataset_hash"] and ckpt["config_hash"] == cfg.config_hash
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "best_metric"} <= set(ckpt)

    # A second run on the same data, killed after epoch 1, then restarted: resumes at epoch 2
    # and ends with exactly the weights of the uninterrupted run (same seed, CPU).
    write_manifests(cfg, "test_v2_2026_01_02", world["rows"])
    run_b = insert_run(cfg, "test_v2_2026_01_02", world["dataset_hash"])
    with pytest.raises(Stop):
        jobs.train.run(cfg, run_ref=run_b, epoch_callback=stop_after(1))
    b_paths = paths.of(cfg).run("test_v2_2026_01_02")
    b_dir = b_paths.root
    assert train_model.load_weights_only(b_paths.last_checkpoint)["epoch"] == 1
    assert run_status(cfg, run_b)[0] == "cached"
    seen = []
    resumed = jobs.train.run(cfg, run_ref=run_b, epoch_callback=lambda e, r: seen.append(e))
    assert seen == [2] and resumed["resumed_from_epoch"] == 1 and resumed["epochs_run"] == 2
    assert [int(r["epoch"]) for r in _history(b_dir / "history.csv")] == [1, 2]
    assert resumed["last_weights_sha256"] == out["last_weights_sha256"]

    # Already trained: exit 0, nothing redone.
    again = jobs.train.run(cfg, run_ref=world["run_id"])
    assert again["status"] == "already_done"


def test_resume_refuses_other_dataset_or_config(fast_cfg, make_cfg):
    cfg = fast_cfg
    world = make_world(cfg)
    with pytest.raises(Stop):
        jobs.train.run(cfg, epoch_callback=stop_after(1))
    last = paths.of(cfg).run(world["model_version"]).last_checkpoint
    before = last.read_bytes()

    other_cfg = make_cfg(**{**FAST, "train__lr": 0.01})
    with pytest.raises(InputError, match="config hash"):
        jobs.train.run(other_cfg)
    # settings that do not change the result (evaluate:, worker count) do not block a resume
    same = make_cfg(**{**FAST, "evaluate__min_slice_size": 5, "train__num_workers": 1})
    assert same.train_hash == cfg.train_hash and same.config_hash != cfg.config_hash

    with db.connect(cfg) as conn:
        conn.execute(
            sql.SQL("update {} set dataset_hash = %s where id = %s").format(
                table(cfg, "model_training_runs")
            ),
            ("e" * 64, world["run_id"]),
        )
    with pytest.raises(InputError, match="dataset"):
        jobs.train.run(cfg)
    assert last.read_bytes() == before  # refused before touching anything


def test_resume_refuses_other_training_rows_of_the_same_dataset(fast_cfg):
    # Same run, same dataset hash, but the active manifests changed (re-cached with other
    # downloads failing): the epochs in last.pt were trained on other rows.
    cfg = fast_cfg
    world = make_world(cfg, n=60)
    with pytest.raises(Stop):
        jobs.train.run(cfg, epoch_callback=stop_after(1))
    last = paths.of(cfg).run(world["model_version"]).last_checkpoint
    assert train_model.load_weights_only(last)["data_hash"]
    before = last.read_bytes()
    recache(cfg, world["run_id"], world["model_version"], world["rows"][5:])
    with pytest.raises(InputError, match="other training rows"):
        jobs.train.run(cfg)
    assert last.read_bytes() == before


def test_a_changed_active_manifest_is_refused_exit_2(fast_cfg):
    """Training verifies the active manifests against the sha256 the cache step recorded
    (docs/faults.md 31): a valid Parquet with one label changed is refused, naming the file,
    before anything is written; so is a manifest the cache record does not know."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = fast_cfg
    world = make_world(cfg, n=40)
    path = paths.of(cfg).run(world["model_version"]).active_manifest("val")
    t = pq.read_table(path)
    labels = t.column("label_value").to_pylist()
    labels[0] = 5.0 - labels[0]
    i = t.column_names.index("label_value")
    pq.write_table(t.set_column(i, "label_value", pa.array(labels, pa.float64())), path)
    with pytest.raises(InputError, match="manifest_val.parquet changed after the cache") as err:
        jobs.train.run(cfg)
    assert err.value.exit_code == 2 and str(path) in str(err.value)
    assert "airatings cache --run" in str(err.value)
    assert run_status(cfg, world["run_id"])[0] == "cached"  # fixable: not marked failed
    assert not paths.of(cfg).run(world["model_version"]).last_checkpoint.exists()

    unrecorded = insert_run(cfg, "test_v2_unrecorded", world["dataset_hash"])  # no manifests
    write_manifests(cfg, "test_v2_unrecorded", world["rows"])  # written after the record
    with pytest.raises(InputError, match="holds no sha256"):
        jobs.train.run(cfg, run_ref=unrecorded)


def _set_status(cfg, run_id, status):
    with db.connect(cfg) as conn:
        conn.execute(
            sql.SQL("update {} set status = %s where id = %s").format(
                table(cfg, "model_training_runs")
            ),
            (status, run_id),
        )


def test_already_trained_is_checked_not_assumed(fast_cfg):
    """A run at 'trained' (or 'evaluated') whose best.pt is missing or is not the recorded file
    is trained again, never left at an exit-2 dead end; past 'evaluated' (its ONNX export came
    from that file) it is refused, naming the fix."""
    from jobs.artifacts import sha256_file

    cfg = fast_cfg
    world = make_world(cfg, n=40)
    first = jobs.train.run(cfg)
    best = paths.of(cfg).run(world["model_version"]).best_checkpoint
    assert first["best_checkpoint_sha256"] == sha256_file(best)
    assert jobs.train.run(cfg)["status"] == "already_done"

    best.unlink()
    again = jobs.train.run(cfg)
    assert again["status"] == "trained" and best.is_file()
    assert again["resumed_from_epoch"] is None  # from scratch, not from the stale last.pt
    assert again["best_weights_sha256"] == first["best_weights_sha256"]  # same seed, CPU
    assert run_status(cfg, world["run_id"])[0] == "trained"

    # changed bytes (a valid checkpoint with other weights), at 'evaluated'
    _set_status(cfg, world["run_id"], "evaluated")
    ckpt = train_model.load_weights_only(best)
    name = next(iter(ckpt["model"]))
    ckpt["model"][name] = ckpt["model"][name] + 1
    torch.save(ckpt, best)
    again = jobs.train.run(cfg)
    assert again["status"] == "trained" and "evaluation_stale" not in again
    assert sha256_file(best) == again["best_checkpoint_sha256"]
    assert run_status(cfg, world["run_id"])[0] == "evaluated"  # never moved backwards

    _set_status(cfg, world["run_id"], "onnx_exported")
    best.unlink()
    with pytest.raises(InputError, match="not retrained in place") as err:
        jobs.train.run(cfg)
    assert str(best) in str(err.value) and err.value.exit_code == 2
    assert run_status(cfg, world["run_id"])[0] == "onnx_exported"


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused(fast_cfg, tmp_path):
    cfg = fast_cfg
    world = make_world(cfg, n=40)
    marker = tmp_path / "pwned"
    last = paths.of(cfg).run(world["model_version"]).last_checkpoint
    last.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": engine.CHECKPOINT_FORMAT, "model": _Evil(marker)}, last)
    with pytest.raises(InputError, match="refusing to load"):
        jobs.train.run(cfg)
    assert not marker.exists()
    # and a plain pickle file is refused the same way
    last.write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(InputError, match="refusing to load"):
        train_model.load_weights_only(last)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("target", "metric", "extra"),
    [
        ("binary", "val_auc", {"train__sample_weighting": "sqrt_count"}),
        ("distribution", "val_mae", {}),
    ],
)
def test_other_targets_train(make_cfg, target, metric, extra):
    cfg = make_cfg(**{**FAST, "train__target": target, **extra})
    db.migrate(cfg)
    make_world(cfg, n=200)
    out = jobs.train.run(cfg)
    assert out["status"] == "trained" and out["metric"] == metric
    assert out["spec"]["target"] == target
    model, ckpt = train_model.model_from_checkpoint(
        paths.of(cfg).run(out["model_version"]).best_checkpoint
    )
    x = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    with torch.inference_mode():
        raw = model(x)
        scores = train_model.scores_from_outputs(raw, target)
        # float NCHW 0..255 gives the same output as uint8 NHWC
        raw_f = model(x.permute(0, 3, 1, 2).float())
    assert raw.shape == (3, train_model.NUM_OUTPUTS[target])
    assert torch.allclose(raw, raw_f, atol=1e-5)
    assert bool(((scores >= 0) & (scores <= 5)).all())


def test_resnet18_backbone_builds_and_steps(make_cfg):
    spec = {"backbone": "resnet18", "target": "regression", "input_size": 64}
    model = train_model.build_model(spec)
    out = model(torch.zeros(2, 64, 64, 3, dtype=torch.uint8))
    assert out.shape == (2, 1)
    assert len(train_model.head_parameters(model)) == 2  # the new Linear's weight and bias
    assert len(train_model.backbone_parameters(model)) + 2 == len(list(model.parameters()))


def test_emd_loss_matches_hand_computed_value():
    uniform_logits = torch.zeros(2, 6)
    target = torch.tensor([[0, 0, 0, 0, 0, 1.0], [1.0, 0, 0, 0, 0, 0]])
    # CDF(pred) = k/6; CDF(target) = [0,0,0,0,0,1] -> squared gaps (1+4+9+16+25+0)/36 over 6 bins
    expected = math.sqrt(55 / 216)
    got = engine.emd_loss(uniform_logits, target)
    assert torch.allclose(got, torch.tensor([expected, expected]), atol=1e-6)
    assert float(engine.emd_loss(torch.zeros(1, 6), torch.full((1, 6), 1 / 6))[0]) < 1e-5
    # a peaked prediction on the right bin beats a uniform one
    peaked = torch.tensor([[-20.0, -20, -20, -20, -20, 20]])
    assert float(engine.emd_loss(peaked, target[:1])[0]) < 1e-4


def test_histogram_smoothing_and_weights():
    k = train_data.smoothing_kernel(0.5)
    assert np.allclose(k.sum(axis=1), 1)
    e2 = math.exp(-2)
    assert k[4, 4] == pytest.approx(1 / (1 + 2 * e2 + math.exp(-8) + math.exp(-18) + math.exp(-32)))
    assert np.allclose(train_data.smoothing_kernel(0), np.eye(6))
    assert np.allclose(train_data.label_to_bins(3.25), [0, 0, 0, 0.75, 0.25, 0])
    assert np.allclose(train_data.label_to_bins(5.0), [0, 0, 0, 0, 0, 1])
    split = train_data.Split(
        name="train",
        snapshot_id=np.arange(3),
        label=np.array([4.0, 2.5, 1.0]),
        is_good=np.array([True, False, False]),
        rating_count=np.array([1, 4, 0]),
        hist=np.array([[0, 0, 0, 0, 1, 0], [0, 0, 2, 2, 0, 0], [0, 0, 0, 0, 0, 0.0]]),
        manual=np.array([False, False, True]),
        image_paths=[],
    )
    raw = train_data.distribution_targets(split, 0.0)
    assert np.allclose(raw, [[0, 0, 0, 0, 1, 0], [0, 0, 0.5, 0.5, 0, 0], [0, 1, 0, 0, 0, 0]])
    smooth = train_data.distribution_targets(split, 0.5)
    assert np.allclose(smooth.sum(axis=1), 1) and np.allclose(smooth[0], k[4])
    w = train_data.sample_weights(split, split, "sqrt_count")
    assert w.mean() == pytest.approx(1.0, abs=1e-6)
    assert w[1] / w[0] == pytest.approx(2.0)  # 4 raters count twice one rater
    assert np.all(train_data.sample_weights(split, split, "none") == 1)


def test_empty_or_single_valued_training_data_fails_the_run(fast_cfg):
    cfg = fast_cfg
    from train_fixtures import world_rows, write_images

    rows = world_rows(60)
    write_images(cfg, rows)
    empty = [dict(r, split="val") if r["split"] == "train" else r for r in rows]
    w1 = make_world(cfg, rows=empty, model_version="empty_v2_2026_01_01")
    with pytest.raises(InputError, match="training split is empty"):
        jobs.train.run(cfg, run_ref=w1["run_id"])
    status, reason = run_status(cfg, w1["run_id"])
    assert status == "failed" and "empty" in reason
    assert not (paths.of(cfg).run("empty_v2_2026_01_01").best_checkpoint).exists()

    flat = [dict(r, label_value=3.0, is_good=False) for r in rows]
    w2 = make_world(cfg, rows=flat, model_version="flat_v2_2026_01_01")
    with pytest.raises(InputError, match="single-valued"):
        jobs.train.run(cfg, run_ref=w2["run_id"])
    assert run_status(cfg, w2["run_id"])[0] == "failed"


def test_non_finite_loss_fails_the_run(make_cfg):
    cfg = make_cfg(**{**FAST, "train__lr": 1e30, "train__warmup_epochs": 0})
    db.migrate(cfg)
    world = make_world(cfg, n=120)
    with pytest.raises(InputError, match="loss became"):
        jobs.train.run(cfg)
    status, reason = run_status(cfg, world["run_id"])
    assert status == "failed" and "loss" in reason
    assert not (paths.of(cfg).run(world["model_version"]).best_checkpoint).exists()


def test_missing_imagenet_weights_stop_unless_random_init_allowed(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache
    cfg = make_cfg(**{**FAST, "train__weights": "imagenet"})
    db.migrate(cfg)
    world = make_world(cfg, n=40)
    with pytest.raises(InputError, match=r"mobilenet_v3_small-047dcff4\.pth") as info:
        jobs.train.run(cfg)
    assert "airatings weights pull mobilenet_v3_small" in str(info.value)
    assert run_status(cfg, world["run_id"])[0] == "cached"  # fixable: not marked failed

    # a local weights file (here: torchvision's architecture with its own init) is loaded
    import torchvision

    ref = torchvision.models.mobilenet_v3_small(weights=None)
    path = tmp_path / "w.pth"
    torch.save(ref.state_dict(), path)
    cfg2 = make_cfg(**{**FAST, "train__weights": "imagenet", "train__weights_path": str(path)})
    with db.connect(cfg) as conn:
        run = get_run(conn, cfg, world["run_id"])
    train = train_data.load_split(cfg2, run, "train")
    spec = {"backbone": "mobilenet_v3_small", "target": "regression", "input_size": 64}
    model, used = engine.build_model(cfg2, spec, train, resuming=False)
    assert used == f"imagenet:{path}"
    assert torch.equal(model.backbone.features[0][0].weight, ref.features[0][0].weight)

    cfg3 = make_cfg(**{**FAST, "train__weights": "imagenet", "train__allow_random_init": True})
    _, used = engine.build_model(cfg3, spec, train, resuming=False)
    assert used.startswith("random")


def test_second_concurrent_train_exits_saying_so(fast_cfg):
    cfg = fast_cfg
    world = make_world(cfg, n=40)
    with db.job_lock(cfg, "train", world["run_id"]) as held:
        assert held
        out = jobs.train.run(cfg)
    assert out["status"] == "skipped" and "another" in out["reason"]
    assert run_status(cfg, world["run_id"])[0] == "cached"
    assert not (paths.of(cfg).run(world["model_version"]).last_checkpoint).exists()


def test_same_seed_same_weights_with_dataloader_workers(make_cfg):
    # One seed seeds the DataLoader workers too: two runs with a worker process each (the
    # augmentation runs there) end with the same weights.
    cfg = make_cfg(**{**FAST, "train__num_workers": 1, "train__epochs": 1})
    db.migrate(cfg)
    world = make_world(cfg, n=80, model_version="test_v2_2026_02_01")
    first = jobs.train.run(cfg, run_ref=world["run_id"])
    write_manifests(cfg, "test_v2_2026_02_02", world["rows"])
    second = jobs.train.run(
        cfg, run_ref=insert_run(cfg, "test_v2_2026_02_02", world["dataset_hash"])
    )
    assert first["num_workers"] == 1
    assert first["last_weights_sha256"] == second["last_weights_sha256"]
    # and the seed is really what decides them
    other = make_cfg(**{**FAST, "train__num_workers": 1, "train__epochs": 1, "train__seed": 99})
    write_manifests(other, "test_v2_2026_02_03", world["rows"])
    third = jobs.train.run(
        other, run_ref=insert_run(other, "test_v2_2026_02_03", world["dataset_hash"])
    )
    assert third["last_weights_sha256"] != first["last_weights_sha256"]


def test_augmentation_without_jitter_is_the_preprocessing_contract(tmp_path):
    # The training crop path (torch uint8 ops) must agree with jobs.images.preprocess
    # (Pillow) when the crop keeps the whole frame and no jitter applies: same picture to
    # within one grey level, or its mirror image (the flip stays random).
    from PIL import Image

    from jobs import images

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (90, 160, 3), dtype=np.uint8)
    arr[:45] = [250, 120, 40]  # structure, so the mirror differs from the original
    path = tmp_path / "a.jpg"
    Image.fromarray(arr).save(path, quality=95)
    ds = train_data.ManifestDataset(
        [path],
        np.zeros(1),
        np.ones(1),
        64,
        augment=True,
        aug={"min_scale": 1.0, "ratio_jitter": 0.0, "brightness": 0.0, "contrast": 0.0},
    )
    ref = torch.from_numpy(images.preprocess(train_data.open_rgb(path), 64).copy()).int()
    for _ in range(4):
        got = ds[0][0].int()
        assert got.shape == (64, 64, 3) and ds[0][0].dtype == torch.uint8
        diff = min(int((got - ref).abs().max()), int((got - ref.flip(1)).abs().max()))
        assert diff <= 1


@pytest.mark.parametrize("b,c", [(1.1, 0.9), (0.9, 1.1), (1.0, 0.92), (1.07, 1.0)])
def test_brightness_contrast_matches_pil_image_enhance(b, c):
    # The fused uint8 map must be what PIL's ImageEnhance.Brightness then .Contrast give (the
    # documented augmentation), away from saturation, to within rounding: PIL truncates after
    # each of its two blends, the fused map rounds once, so PIL is up to 2 levels lower.
    from PIL import Image, ImageEnhance

    arr = np.random.default_rng(1).integers(30, 200, (48, 80, 3), dtype=np.uint8)
    ref = ImageEnhance.Contrast(ImageEnhance.Brightness(Image.fromarray(arr)).enhance(b)).enhance(c)
    got = train_data.brightness_contrast(torch.from_numpy(arr.copy()), b, c)
    assert got.dtype == torch.uint8 and got.shape == arr.shape
    diff = got.int() - torch.from_numpy(np.array(ref)).int()
    assert int(diff.min()) >= 0 and int(diff.max()) <= 2
