"""`airatings export-onnx`: the graph with the resize inside, the parity gate on real images,
the atomic write and "already done"; external data outside the model's folder refused.

One tiny world is trained once for the module (originals larger than the training copies, so
the in-graph resize chain has work to do); each test exports its own copy of that run.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest
import torch
from export_fixtures import make_config, scratch_database
from onnx import helper, numpy_helper
from PIL import Image
from psycopg import sql
from train_fixtures import FAST, make_world, run_status, sky_image, world_rows

import jobs.evaluate
import jobs.train
from jobs import db, onnx_export, paths, runs
from jobs.artifacts import owner_tag
from jobs.errors import InputError
from jobs.images import encode_jpeg, load_image, preprocess, resize_short_side
from jobs.onnx_files import load_checked
from jobs.train.model import model_from_checkpoint

SHORT_SIDE = 64  # the training copies' short side (cache.train_short_side)
ORIGINAL = (96, 160)  # most originals (h, w): the chain takes them to 64 x 106, then 64 x 64
PORTRAIT = (150, 90)  # every 7th: another shape in the same test split


def _write_images(cfg, rows):
    """Originals (JPEG, larger than the training copy) and the training copies derived from
    them the way the cache does (resize_short_side + encode_jpeg)."""
    rng = np.random.default_rng(3)
    images = paths.of(cfg).images
    for i, r in enumerate(rows):
        h, w = PORTRAIT if i % 7 == 3 else ORIGINAL
        data = sky_image(r["label_value"], rng, size=h, width=w)
        sha = hashlib.sha256(data).hexdigest()
        original = images.original(sha, "jpg")
        original.parent.mkdir(parents=True, exist_ok=True)
        original.write_bytes(data)
        img = load_image(original, max_pixels=cfg.cache.max_pixels)
        copy = images.train_copy(sha, SHORT_SIDE)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(encode_jpeg(resize_short_side(img, SHORT_SIDE), cfg.cache.jpeg_quality))
        r["image_sha256"] = sha
        r["image_path"] = images.original_rel(sha, "jpg")
        r["train_image_path"] = images.train_rel(sha, SHORT_SIDE)


@pytest.fixture(scope="module")
def trained(pg_server, tmp_path_factory):
    """A run trained on the tiny world and evaluated (which fits the calibration)."""
    tmp = tmp_path_factory.mktemp("onnx")
    with scratch_database(pg_server) as url:
        cfg = make_config(
            url,
            tmp,
            # 4 epochs, not FAST's 2: at 2 the tiny world's best (epoch 1) predicts one value
            # for every validation image, and the calibration then falls back (no isotonic fit)
            **{**FAST, "train__epochs": 4},
            cache__train_short_side=SHORT_SIDE,
            evaluate__bootstrap_samples=50,
        )
        db.migrate(cfg)
        rows = world_rows(160, seed=5, good_threshold=cfg.dataset.good_threshold)
        _write_images(cfg, rows)
        world = make_world(cfg, rows=rows)
        jobs.train.run(cfg)
        jobs.evaluate.run(cfg)
        yield cfg, world


_copies = itertools.count(1)


def fresh_run(cfg, world) -> tuple[str, int]:
    """A copy of the trained run (same files, same records) at 'evaluated', not exported."""
    base = world["model_version"]
    version = f"{base}_c{next(_copies)}"
    src, dst = paths.of(cfg).run(base).root, paths.of(cfg).run(version).root
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.onnx", "parity.json", ".tmp-*"))
    t = runs.table(cfg, "model_training_runs")
    with db.connect(cfg) as conn:
        (run_id,) = conn.execute(
            sql.SQL(
                "insert into {t} (model_version, status, dataset_hash, config_hash, params_json)"
                " select %s, 'evaluated', dataset_hash, config_hash, params_json - 'onnx'"
                " from {t} where id = %s returning id"
            ).format(t=t),
            (version, world["run_id"]),
        ).fetchone()
    return version, run_id


def _params(cfg, run_id) -> dict:
    with db.connect(cfg) as conn:
        return conn.execute(
            sql.SQL("select params_json from {} where id = %s").format(
                runs.table(cfg, "model_training_runs")
            ),
            (run_id,),
        ).fetchone()[0]


def _eager_scorer(cfg, version):
    model, ckpt = model_from_checkpoint(paths.of(cfg).run(version).best_checkpoint)
    spec = ckpt["spec"]
    return onnx_export.build_scorer(model, spec["target"], SHORT_SIDE, spec["input_size"])


def test_export_checks_parity_records_and_redoes_a_tampered_file(trained):
    cfg, world = trained
    version, run_id = fresh_run(cfg, world)
    run_paths = paths.of(cfg).run(version)
    # what an export killed mid-write leaves: its temp file, never a file at the final name
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = run_paths.root / f".tmp-h{owner_tag()}-p{dead.pid}-0123456789ab-model.onnx"
    stale.write_bytes(b"half a model")
    out = onnx_export.run(cfg, run_ref=version)
    assert not stale.exists()  # swept on the next start

    assert out["status"] == "onnx_exported" and run_status(cfg, run_id)[0] == "onnx_exported"
    model = load_checked(run_paths.onnx, expected_sha256=out["onnx_sha256"])
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == onnx_export.OPSET == out["opset"]
    assert out["io"] == {
        "inputs": [{"name": "image", "dtype": "uint8", "shape": ["batch", "height", "width", 3]}],
        "outputs": [{"name": "raw_score", "dtype": "float32", "shape": ["batch"]}],
    }
    resizes = [n for n in model.graph.node if n.op_type == "Resize"]
    assert len(resizes) == 2
    for node in resizes:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["antialias"] == 1 and attrs["exclude_outside"] == 1
        assert (
            attrs["mode"] == b"linear" and attrs["coordinate_transformation_mode"] == b"half_pixel"
        )

    # metadata: what a scorer needs is in the file
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["model_version"] == version and meta["target"] == "regression"
    assert json.loads(meta["calibration"]) == out["calibration"]
    pre = json.loads(meta["preprocessing"])
    assert pre["in_graph"] is True and pre["steps"][1]["short_side"] == SHORT_SIDE
    assert pre["steps"][2]["size"] == [FAST["train__input_size"]] * 2
    assert json.loads(meta["input_names"]) == ["image"]
    assert json.loads(meta["output_names"]) == ["raw_score"]

    # parity at batch 1 (every golden image), 7 and the largest (the whole test split here)
    n_test = pq.read_metadata(run_paths.active_manifest("test")).num_rows
    parity = out["parity"]
    assert set(parity["batches"]) == {"1", "7", str(n_test)}
    assert parity["batches"]["1"]["n"] == n_test
    assert all(
        b["max_abs_delta_raw"] <= onnx_export.TOLERANCE_RAW for b in parity["batches"].values()
    )
    assert (
        parity["passed"] and parity["gate"]["identical"] and parity["gate"]["disagreements"] == []
    )
    assert parity["gate"]["golden_images"] == n_test
    doc = json.loads(run_paths.parity.read_text())
    assert len(doc["parity"]["gate"]["nearest"]) == onnx_export.NEAR_THRESHOLD
    margins = [abs(r["margin"]) for r in doc["parity"]["gate"]["nearest"]]
    assert margins == sorted(margins)
    assert {tuple(r["shape"]) for r in doc["images"]} == {(*ORIGINAL, 3), (*PORTRAIT, 3)}
    assert out["calibration"]["method"] == "isotonic"
    stats = out["original_vs_training_copy"]
    assert stats["n"] == n_test and 0 <= stats["mean"] <= stats["p95"] <= stats["max"] <= 5
    assert out["simplified"]["check_ok"] in (True, False)
    assert isinstance(out["simplified"]["kept"], bool)

    params = _params(cfg, run_id)["onnx"]
    assert params["onnx_sha256"] == hashlib.sha256(run_paths.onnx.read_bytes()).hexdigest()
    assert params["parity"]["max_abs_delta_raw"] == parity["max_abs_delta_raw"]
    assert params["calibration"]["x"] == out["calibration"]["x"]
    # one calibration: the knots evaluate fitted (and its report shows) are the ones exported
    assert out["calibration"] == _params(cfg, run_id)["evaluate"]["calibration"]

    # dynamic H x W: two sizes through one session at batch 1, as PyTorch scores them
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    scorer = _eager_scorer(cfg, version)
    test = pq.read_table(run_paths.active_manifest("test")).to_pydict()
    sizes = set()
    for rel in test["image_path"]:
        arr = np.array(load_image(cfg.artifacts_dir / rel, max_pixels=cfg.cache.max_pixels))
        if arr.shape in sizes:
            continue
        sizes.add(arr.shape)
        got = session.run(["raw_score"], {"image": arr[None]})[0]
        with torch.inference_mode():
            want = scorer(torch.from_numpy(arr[None])).numpy()
        assert (
            got.shape == (1,) and abs(float(got[0]) - float(want[0])) <= onnx_export.TOLERANCE_RAW
        )
    assert len(sizes) == 2

    # a re-run finds the work done ...
    again = onnx_export.run(cfg, run_ref=version)
    assert again["status"] == "already_done" and again["onnx_sha256"] == out["onnx_sha256"]

    # ... a changed file is exported again ...
    tampered = onnx.load(run_paths.onnx)
    helper.set_model_props(tampered, {"model_version": "someone_else"})
    onnx.save(tampered, run_paths.onnx)
    redone = onnx_export.run(cfg, run_ref=version)
    assert redone["status"] == "onnx_exported"
    assert hashlib.sha256(run_paths.onnx.read_bytes()).hexdigest() == redone["onnx_sha256"]
    meta = {p.key: p.value for p in load_checked(run_paths.onnx).metadata_props}
    assert meta["model_version"] == version

    # ... and so is a missing one
    run_paths.onnx.unlink()
    assert (
        onnx_export.run(cfg, run_ref=version)["status"] == "onnx_exported"
        and run_paths.onnx.is_file()
    )
    assert not list(run_paths.root.glob(".tmp-*"))


def test_a_perturbed_graph_fails_the_gate_and_writes_nothing(trained):
    cfg, world = trained
    version, run_id = fresh_run(cfg, world)
    run_paths = paths.of(cfg).run(version)
    seen = []

    def perturb(model: onnx.ModelProto) -> None:
        # the head's bias (the regression output's offset) moved by 1e-3: 10x the tolerance
        for init in model.graph.initializer:
            if init.name.endswith("classifier.3.bias"):
                arr = numpy_helper.to_array(init) + np.float32(1e-3)
                init.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), init.name))
                seen.append(init.name)

    with pytest.raises(InputError, match=r"parity gate failed: .* above the tolerance") as err:
        onnx_export.run(cfg, run_ref=version, graph_hook=perturb)
    assert seen, "the head's bias is an initializer of the exported graph"
    assert err.value.exit_code == 2
    assert not run_paths.onnx.exists() and not run_paths.parity.exists()
    assert not list(run_paths.root.glob(".tmp-*"))
    assert run_status(cfg, run_id)[0] == "evaluated"
    assert "onnx" not in _params(cfg, run_id)

    # the same run without the perturbation passes
    assert onnx_export.run(cfg, run_ref=version)["status"] == "onnx_exported"


def test_export_refuses_a_run_evaluated_without_calibration(trained):
    """A run evaluated before evaluate fitted the calibration has no knots to export: the
    error says to evaluate again; nothing is written."""
    cfg, world = trained
    version, run_id = fresh_run(cfg, world)
    t = runs.table(cfg, "model_training_runs")
    with db.connect(cfg) as conn:
        conn.execute(
            sql.SQL(
                "update {} set params_json = jsonb_set(params_json, '{{evaluate}}',"
                " (params_json->'evaluate') - 'calibration') where id = %s"
            ).format(t),
            (run_id,),
        )
    with pytest.raises(InputError, match="no calibration from evaluate.*airatings evaluate --run"):
        onnx_export.run(cfg, version)
    assert not paths.of(cfg).run(version).onnx.exists()
    assert run_status(cfg, run_id)[0] == "evaluated"


def test_export_needs_an_evaluated_run(trained):
    cfg, world = trained
    version, run_id = fresh_run(cfg, world)
    with db.connect(cfg) as conn:
        conn.execute(
            sql.SQL("update {} set status = 'trained' where id = %s").format(
                runs.table(cfg, "model_training_runs")
            ),
            (run_id,),
        )
    with pytest.raises(InputError, match="needs 'evaluated'"):
        onnx_export.run(cfg, run_ref=version)
    assert not paths.of(cfg).run(version).onnx.exists()


# ---- the resize chain ------------------------------------------------------------------------


class _Chain(torch.nn.Module):
    """uint8 NHWC -> the first resize step (short side), for its output size."""

    def __init__(self, short_side: int, size: int | None = None):
        super().__init__()
        self.short_side, self.size = short_side, size

    def forward(self, image):
        x = image.permute(0, 3, 1, 2).float()
        if self.size is not None:
            return onnx_export.resize_chain(x, self.short_side, self.size)
        import torch.nn.functional as F

        size = onnx_export.short_side_size(x, self.short_side)
        return F.interpolate(x, size=size, mode="bilinear", antialias=True)


def _export_chain(module, sample) -> ort.InferenceSession:
    onnx_export.register_symbolics()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
        torch.onnx.export(
            module,
            (sample,),
            buf,
            dynamo=False,
            opset_version=onnx_export.OPSET,
            input_names=["image"],
            output_names=["out"],
            dynamic_axes={"image": {0: "n", 1: "h", 2: "w"}},
        )
    return ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])


def _smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A photo-like picture: a few colours bilinearly spread, plus mild noise."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8))
    big = np.asarray(small.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float64)
    return np.clip(big + rng.normal(0, 4, big.shape), 0, 255).astype(np.uint8)


def test_in_graph_short_side_sizes_are_dynamic_and_never_upscale():
    session = _export_chain(_Chain(256), torch.zeros(1, 300, 400, 3, dtype=torch.uint8))
    for h, w in [(360, 640), (1080, 1920), (322, 322), (257, 2000), (600, 800), (200, 120)]:
        out = session.run(None, {"image": np.zeros((1, h, w, 3), np.uint8)})[0]
        m = min(h, w)
        s = min(m, 256)
        assert out.shape == (1, 3, h * s // m, w * s // m), (h, w)
        if m > 256:
            assert min(out.shape[2:]) == 256
    # the cache's training copy has the same size where its float formula is exact
    img = Image.fromarray(_smooth(360, 640))
    assert resize_short_side(img, 256).size == (455, 256)


@pytest.mark.parametrize("hw", [(360, 640), (540, 960), (150, 200)])
def test_in_graph_chain_matches_torch_and_the_pillow_chain(hw):
    """ONNX Resize (antialias) == torch interpolate(antialias) to float rounding, and within
    two levels of the cache + preprocess chain in Pillow (which rounds to uint8 after each
    step and JPEG-encodes the training copy; here without the JPEG)."""
    chain = _Chain(256, 224)
    session = _export_chain(chain, torch.zeros(1, 300, 400, 3, dtype=torch.uint8))
    pic = _smooth(*hw)
    got = session.run(None, {"image": pic[None]})[0][0].transpose(1, 2, 0)
    with torch.inference_mode():
        want = chain(torch.from_numpy(pic[None]))[0].permute(1, 2, 0).numpy()
    assert np.abs(got - want).max() < 0.02
    pil = preprocess(resize_short_side(Image.fromarray(pic), 256), 224).astype(np.float64)
    diff = np.abs(got - pil)
    # measured: mean 0.29-0.33, max 1.0-1.4 levels (two uint8 roundings in Pillow)
    assert diff.mean() < 0.5 and diff.max() <= 2.0, (diff.mean(), diff.max())


# ---- external data -----------------------------------------------------------------------------


def _model_with_external_weight(folder: Path, location: str) -> Path:
    """y = x + W with W (4 floats) stored as external data at ``location``."""
    w = numpy_helper.from_array(np.arange(4, dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="w.bin", size_threshold=0)
    if location != "w.bin":
        proto = onnx.load(path, load_external_data=False)
        for entry in proto.graph.initializer[0].external_data:
            if entry.key == "location":
                entry.value = location
        path.write_bytes(proto.SerializeToString())
    return path


def test_external_data_inside_the_folder_loads(tmp_path):
    path = _model_with_external_weight(tmp_path / "m", "w.bin")
    model = load_checked(path)
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[0]), np.arange(4))


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_folder_is_refused(tmp_path, where):
    folder = tmp_path / "m"
    _model_with_external_weight(folder, "w.bin")
    secret = tmp_path / "secret.bin"
    shutil.copy(folder / "w.bin", secret)  # readable, so only the check stops it
    if where == "parent":
        location = "../secret.bin"
    elif where == "absolute":
        location = str(secret)
    else:
        (folder / "link.bin").symlink_to(secret)
        location = "link.bin"
    path = _model_with_external_weight(folder, location)
    with pytest.raises(InputError, match="outside the model's folder"):
        load_checked(path)


def test_a_file_that_is_not_onnx_or_not_the_recorded_one_is_refused(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x00not a protobuf\xff" * 10)
    with pytest.raises(InputError, match="not a readable ONNX model"):
        load_checked(bad)
    good = _model_with_external_weight(tmp_path / "m", "w.bin")
    with pytest.raises(InputError, match="sha256"):
        load_checked(good, expected_sha256="0" * 64)


def test_a_changed_manifest_or_checkpoint_is_refused_before_any_work(trained):
    cfg, world = trained
    version, run_id = fresh_run(cfg, world)
    run_paths = paths.of(cfg).run(version)
    val = run_paths.active_manifest("val")
    original = val.read_bytes()
    val.write_bytes(original + b"\0")
    with pytest.raises(InputError, match=r"manifest_val.parquet changed after it was written"):
        onnx_export.run(cfg, run_ref=version)
    val.write_bytes(original)
    best = run_paths.best_checkpoint
    best.write_bytes(best.read_bytes() + b"\0")
    with pytest.raises(InputError, match=r"best.pt changed after it was written"):
        onnx_export.run(cfg, run_ref=version)
    assert not run_paths.onnx.exists() and run_status(cfg, run_id)[0] == "evaluated"


@pytest.mark.parametrize("target", ["binary", "distribution"])
def test_raw_score_per_target_exports_and_maps_to_the_models_score(target):
    """binary: the logit; distribution: the expected rating from the six logits, in the graph."""
    from jobs.train.model import build_model, scores_from_outputs

    torch.manual_seed(0)
    net = build_model({"backbone": "mobilenet_v3_small", "target": target, "input_size": 32})
    scorer = onnx_export.build_scorer(net.eval(), target, 48, 32)
    pics = np.stack([_smooth(60, 80, seed) for seed in range(3)])
    session = ort.InferenceSession(
        onnx_export.export_graph(scorer, torch.from_numpy(pics[:1])).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    got = session.run(["raw_score"], {"image": pics})[0]
    with torch.inference_mode():
        x = onnx_export.resize_chain(torch.from_numpy(pics).permute(0, 3, 1, 2).float(), 48, 32)
        outputs = net(x)
        score = scores_from_outputs(outputs, target).numpy()
    assert got.shape == (3,)
    if target == "binary":
        np.testing.assert_allclose(got, outputs[:, 0].numpy(), atol=onnx_export.TOLERANCE_RAW)
        np.testing.assert_allclose(5 / (1 + np.exp(-got)), score, atol=1e-4)
    else:
        np.testing.assert_allclose(
            got, score, atol=onnx_export.TOLERANCE_RAW
        )  # the expected rating
