"""`airatings export-onnx [--run ID|latest]`: the run's best checkpoint as one ONNX graph that
takes a decoded picture and returns its raw score, checked against PyTorch before it is kept.

The graph (``model.onnx`` in the run's folder, :mod:`jobs.paths`):

- Input ``image``: uint8 RGB, NHWC, shape ``(batch, height, width, 3)``, all three dynamic.
  A client only decodes (``jobs.images.load_image``: EXIF orientation, RGB, transparency on
  white) and feeds the full frame; it never resizes.
- Inside, the training chain (:func:`resize_chain`, the one implementation Python and Node
  share): cast to float32 NCHW; (1) shorter side to the run's ``cache.train_short_side``
  (256 by default), aspect kept, never upscaled, sizes ``(h * s // m, w * s // m)`` with
  ``m = min(h, w)``, ``s = min(m, short_side)`` in integers; (2) the full frame squashed to
  ``input_size`` x ``input_size`` (no crop). Both steps are ONNX ``Resize`` (opset 18)
  ``mode=linear, antialias=1, exclude_outside=1, coordinate_transformation_mode=half_pixel``:
  bilinear with the filter widened by the downscale factor and out-of-frame taps dropped and
  renormalised, which is PyTorch's ``interpolate(..., mode="bilinear", antialias=True)`` and
  Pillow's BILINEAR resize (what the cache and ``jobs.images.preprocess`` do). No rounding
  between the steps (Pillow rounds to uint8 after each; the measured effect is in
  ``original_vs_training_copy``). Then the network normalises (ImageNet mean/std) itself.
- Output ``raw_score``: float32, shape ``(batch,)``, one number per image:

  - ``regression``: the network's output, the predicted rating (not clamped);
  - ``binary``: the logit of ``is_good`` (``label_value >= dataset.good_threshold``);
  - ``distribution``: the expected rating ``sum_k k * softmax(logits)_k``, k = 0..5 (the six
    logits stay inside the graph).

  ``aiRating`` = the calibration knots applied to ``raw_score`` (:mod:`jobs.calibration`:
  isotonic, fitted by `airatings evaluate` on the validation split's PyTorch raw scores of
  the cache's training copies, recorded in the run's ``params_json['evaluate']`` and reused
  here unchanged); the capture gate is ``aiRating >= dataset.good_threshold``.

Exporter: ``torch.onnx.export(dynamo=False)`` (the TorchScript exporter) at opset 18, with a
symbolic for ``aten::_upsample_bilinear2d_aa`` registered here: torch 2.14's TorchScript
exporter has none (``UnsupportedOperatorError``), and its default dynamo exporter needs
onnxscript, which the locked dependencies do not carry. onnxscript 0.7.2 maps the op to the
same ``Resize`` (``antialias=1, exclude_outside=1, half_pixel``; tried: same outputs), but
its export took 22 s on 2 cores, the TorchScript export 1-2 s. Moving to it means adding
onnxscript (>= 0.7.2, which sets ``exclude_outside=1``) to the locked dependencies.

The job: claim the run (``evaluated`` first), verify the checkpoint and the active val/test
manifests against the sha256s their steps recorded, take evaluate's calibration, export,
``onnx.checker.check_model(full_check=True)``, simplify with onnxsim (kept only when its own
check says so *and* onnxruntime gives the unsimplified graph's outputs on real test images),
write the metadata (``metadata_props``), then the parity gate on the run's real test images
(originals under ``image_path``, decoded by ``jobs.images.load_image``):

- PyTorch eager (the same module: resize chain in torch + the checkpoint's network) against
  onnxruntime at batch 1 (every golden image), 7 and the largest (32, or the test split's
  size if smaller); max |delta raw_score| above :data:`TOLERANCE_RAW` fails the job;
- the capture-gate decision after calibration identical for every golden image: the test
  images (up to :data:`GOLDEN_MAX`) plus the :data:`NEAR_THRESHOLD` whose calibrated score is
  nearest the threshold.

A failure is ``InputError`` (exit 2): nothing at the final paths, the status unchanged. On
success ``parity.json`` and ``model.onnx`` are written atomically (temp name, ``onnx`` load
and check, rename) and the run moves to ``onnx_exported`` with the summary in
``params_json['onnx']``. Also measured and recorded: |delta aiRating| between scoring each
original through the graph and scoring the cache's training copy the way evaluate does
(``original_vs_training_copy``: max, p95, mean).

"Already done" is checked: the same inputs (checkpoint, manifests, calibration, threshold,
format) and
``model.onnx`` / ``parity.json`` with the sha256s recorded -> ``already_done``; a file missing
or changed -> exported again (refused once the run is ``registered``: the registered copy is
the record then). ONNX files are read only through :func:`jobs.onnx_files.load_checked`, which refuses
external data outside the model's folder.

Not done: the optional INT8 static QDQ quantisation of issue [7/11] (config-gated there; not
needed for mobilenet_v3_small, where it measured no gain).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs import calibration, db, logs, paths, runs
from jobs.artifacts import atomic_path, atomic_write_text, sha256_bytes, sha256_file, sweep_temp
from jobs.errors import InputError
from jobs.images import IMAGENET_MEAN, IMAGENET_STD
from jobs.onnx_files import load_checked

if TYPE_CHECKING:
    import onnx
    import torch
    from torch import nn

    from jobs.config import Config

OPSET = 18
INPUT_NAME = "image"
OUTPUT_NAME = "raw_score"
# Bump when the graph or the checks change: an older export is then redone.
# 2: the calibration comes from evaluate's record, not fitted here.
EXPORT_FORMAT = 2

# Max |raw_score(PyTorch) - raw_score(onnxruntime)| on real images, fp32. Both run the same
# float32 graph with different kernels (summation order, conv+bn fused by onnxruntime, the
# antialias weights computed separately), so they agree to rounding: on the demo world's test
# split (130 originals 640x360, mobilenet_v3_small at 160, raw scores 0..5) the largest
# difference was 4.5e-6 at batch 1, 1.7e-6 at 7 and 3.6e-6 at 32, about 1e-6 relative, not
# growing with the batch; the tiny test world gives ~2e-7. 1e-4 leaves 20x headroom for other
# CPUs' kernels and is still 1/1000 of a rating step: a graph that really differs (a changed
# weight, a wrong resize attribute, a dropped normalisation) moves raw scores by 1e-3 and more.
TOLERANCE_RAW = 1e-4
MAX_BATCH = 32  # parity batches: 1, 7 and the largest, min(MAX_BATCH, test images), at least 7
GOLDEN_MAX = 512  # test images checked one by one (the first, in manifest order)
NEAR_THRESHOLD = 16  # plus those whose calibrated training-copy score is nearest the threshold
PREDICT_BATCH = 64
BATCH_PIXELS = MAX_BATCH * 1920 * 1080  # the largest parity batch holds at most this many

EXPORTER = "torch.onnx.export(dynamo=False), opset 18, Resize(antialias=1) symbolic"
RAW_SCORE_MEANING = {
    "regression": "the predicted rating, unclamped",
    "binary": "the logit of is_good (label >= dataset.good_threshold)",
    "distribution": "the expected rating sum_k k * softmax(logits)_k, k = 0..5",
}


# ---- the graph: resize chain + network + raw score -----------------------------------------


def short_side_size(x: torch.Tensor, short_side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, w) of float NCHW ``x`` after step 1: ``(h * s // m, w * s // m)``, ``m = min(h, w)``,
    ``s = min(m, short_side)``, as int64 tensors from the shape (dynamic in the graph)."""
    from torch.onnx.operators import shape_as_tensor

    hw = shape_as_tensor(x)[2:]
    shorter = hw.min()
    sizes = (hw * shorter.clamp(max=short_side)) // shorter  # never upscale
    return sizes[0], sizes[1]


def resize_chain(x: torch.Tensor, short_side: int, size: int) -> torch.Tensor:
    """float NCHW (any H x W) -> float NCHW ``size`` x ``size``: the training chain (module doc).

    Sizes come from the tensor's shape as tensors, so the traced graph keeps H and W dynamic.
    """
    import torch.nn.functional as F

    x = F.interpolate(
        x, size=short_side_size(x, short_side), mode="bilinear", antialias=True, align_corners=False
    )
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@functools.cache
def _scorer_class():
    import torch
    from torch import nn

    class Scorer(nn.Module):
        """uint8 NHWC (any size) -> resize chain -> network (normalises) -> raw_score (N,)."""

        def __init__(self, model: nn.Module, target: str, short_side: int, size: int):
            super().__init__()
            self.model = model
            self.target = target
            self.short_side = int(short_side)
            self.size = int(size)
            self.register_buffer("bins", torch.arange(6, dtype=torch.float32), persistent=False)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            x = image.permute(0, 3, 1, 2).float()
            x = resize_chain(x, self.short_side, self.size)
            from jobs.train.model import raw_scores_from_outputs

            return raw_scores_from_outputs(self.model(x), self.target, self.bins)

    return Scorer


def build_scorer(model: nn.Module, target: str, short_side: int, size: int) -> nn.Module:
    """The exported module around a network from ``jobs.train.model`` (eval mode)."""
    return _scorer_class()(model, target, short_side, size).eval()


def _resize_aa_symbolic(g: Any, x: Any, output_size: Any, align_corners: Any, *_scales: Any):
    """``aten::_upsample_bilinear2d_aa`` -> ONNX Resize (opset 18) with antialias, as eager."""
    from torch.onnx import symbolic_helper

    if symbolic_helper._maybe_get_const(align_corners, "b"):
        raise InputError("antialiased interpolate with align_corners=True has no ONNX export here")
    import torch

    shape = g.op("Shape", x)
    batch_channels = g.op(
        "Slice",
        shape,
        g.op("Constant", value_t=torch.tensor([0], dtype=torch.int64)),
        g.op("Constant", value_t=torch.tensor([2], dtype=torch.int64)),
    )
    sizes = g.op("Concat", batch_channels, output_size, axis_i=0)
    empty = g.op("Constant", value_t=torch.tensor([], dtype=torch.float32))
    return g.op(
        "Resize",
        x,
        empty,  # roi
        empty,  # scales
        sizes,
        mode_s="linear",
        antialias_i=1,
        exclude_outside_i=1,
        coordinate_transformation_mode_s="half_pixel",
    )


def register_symbolics() -> None:
    """Teach the TorchScript exporter antialiased bilinear interpolate (idempotent)."""
    import torch

    torch.onnx.register_custom_op_symbolic(
        "aten::_upsample_bilinear2d_aa", _resize_aa_symbolic, OPSET
    )


def export_graph(scorer: nn.Module, sample: torch.Tensor) -> onnx.ModelProto:
    """``torch.onnx.export`` of the scorer (module doc: exporter, opset, dynamic axes)."""
    import onnx
    import torch

    register_symbolics()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # the TorchScript exporter announces its deprecation; the tracer warns about the
        # shape arithmetic, which is exported as ONNX ops (tested at several sizes)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            scorer,
            (sample,),
            buf,
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={
                INPUT_NAME: {0: "batch", 1: "height", 2: "width"},
                OUTPUT_NAME: {0: "batch"},
            },
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


def io_spec(model: onnx.ModelProto) -> dict[str, Any]:
    """The graph's input and output as names, element types and shapes (dim names or sizes)."""
    import onnx

    def one(v: Any) -> dict[str, Any]:
        t = v.type.tensor_type
        return {
            "name": v.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
            "shape": [d.dim_param or d.dim_value for d in t.shape.dim],
        }

    return {
        "inputs": [one(v) for v in model.graph.input],
        "outputs": [one(v) for v in model.graph.output],
    }


def check_graph(model: onnx.ModelProto) -> None:
    """``check_model(full_check=True)`` and the interface this module promises."""
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise InputError(f"the exported graph fails onnx.checker (full_check): {exc}") from None
    spec = io_spec(model)
    expected = {
        "inputs": [
            {"name": INPUT_NAME, "dtype": "uint8", "shape": ["batch", "height", "width", 3]}
        ],
        "outputs": [{"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch"]}],
    }
    if spec != expected:
        raise InputError(f"the exported graph's interface is {spec}, expected {expected}")


def preprocessing_spec(
    short_side: int, size: int, max_pixels: int, formats: tuple[str, ...] | list[str]
) -> dict[str, Any]:
    """What a client does and what the graph does (recorded in the file and the model card);
    ``max_pixels`` and ``formats``: the decode limits the client applies (``cache.*``)."""
    resize = {
        "onnx": "Resize opset 18: mode=linear, antialias=1, exclude_outside=1, "
        "coordinate_transformation_mode=half_pixel",
        "equivalent": "torch.nn.functional.interpolate(mode='bilinear', antialias=True, "
        "align_corners=False); Pillow Image.resize(BILINEAR)",
    }
    return {
        "client": "decode only: jobs.images.load_image (EXIF orientation applied, any mode to "
        "RGB uint8, transparency composited on (255, 255, 255), first frame of animations); "
        "feed the full frame as uint8 NHWC, do not resize",
        "max_pixels": int(max_pixels),
        "formats": list(formats),
        "in_graph": True,
        "steps": [
            {"op": "cast", "to": "float32 NCHW, 0..255"},
            {
                "op": "resize_short_side",
                "short_side": short_side,
                "rule": "m = min(h, w); s = min(m, short_side); (h, w) -> (h * s // m, w * s // m) "
                "in integers; never upscales, aspect kept",
                **resize,
            },
            {
                "op": "squash",
                "size": [size, size],
                "rule": "the full frame to size x size, aspect not kept, no crop",
                **resize,
            },
            {
                "op": "normalise",
                "x": "(x / 255 - mean) / std",
                "mean": IMAGENET_MEAN,
                "std": IMAGENET_STD,
            },
        ],
        "rounding_between_steps": "none (float32)",
    }


# ---- loading ONNX files safely -------------------------------------------------------------


# ---- onnxruntime ---------------------------------------------------------------------------


def ort_session(model_bytes: bytes, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])


def ort_raw(session: Any, images: np.ndarray) -> np.ndarray:
    return np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: images})[0], dtype=np.float64)


def torch_raw(scorer: nn.Module, images: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return scorer(torch.from_numpy(np.ascontiguousarray(images))).double().numpy()


def simplify(
    model: onnx.ModelProto, samples: list[np.ndarray], threads: int
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """onnxsim, kept only if its check says ok AND onnxruntime gives the unsimplified graph's
    outputs (within :data:`TOLERANCE_RAW`) on ``samples`` (real test batches)."""
    import onnxsim

    info: dict[str, Any] = {"nodes_before": len(model.graph.node), "kept": False}
    try:
        # its check runs both graphs on a real batch (not random pixels); it prints progress,
        # which must not reach a job's stdout (the summary, JSON with --json)
        with contextlib.redirect_stdout(io.StringIO()):
            simplified, check_ok = onnxsim.simplify(
                model, check_n=1, input_data={INPUT_NAME: samples[-1]}
            )
    except Exception as exc:  # onnxsim raises plain RuntimeErrors from C++: keep the export
        info["reason"] = f"onnxsim failed: {type(exc).__name__}: {str(exc)[:300]}"
        return model, info
    info["check_ok"] = bool(check_ok)
    info["nodes_after"] = len(simplified.graph.node)
    if not check_ok:
        info["reason"] = "onnxsim's own check failed"
        return model, info
    try:
        check_graph(simplified)
    except InputError as exc:
        info["reason"] = f"simplified graph fails the checker: {exc}"
        return model, info
    before = ort_session(model.SerializeToString(), threads)
    after = ort_session(simplified.SerializeToString(), threads)
    delta = max(float(np.max(np.abs(ort_raw(before, s) - ort_raw(after, s)))) for s in samples)
    info["max_abs_delta_vs_unsimplified"] = delta
    if not delta <= TOLERANCE_RAW:
        info["reason"] = f"outputs differ from the unsimplified graph by {delta:.3g}"
        return model, info
    info["kept"] = True
    return simplified, info


# ---- inputs: manifests, images ---------------------------------------------------------------


def verified_manifest(cfg: Config, run: runs.Run, split: str) -> Path:
    """The run's active manifest, checked against the sha256 the cache step recorded."""
    path = paths.of(cfg).run(run.model_version).active_manifest(split)
    recorded = (run.params.get("cache") or {}).get("active_files") or {}
    return runs.verify_recorded(
        path,
        (recorded.get(path.name) or {}).get("sha256"),
        what=f"active {split} manifest",
        fix=f"run 'airatings cache --run {run.model_version}' (it rewrites the active manifests "
        "from the image cache without downloading), then export-onnx again",
    )


def evaluated_calibration(run: runs.Run, target: str) -> dict[str, Any]:
    """The calibration knots evaluate fitted and recorded for ``run`` (params_json['evaluate'])."""
    knots = (run.params.get("evaluate") or {}).get("calibration")
    if not knots or not knots.get("x") or len(knots["x"]) != len(knots.get("y") or []):
        raise InputError(
            f"run {run.model_version} has no calibration from evaluate (it was evaluated by an "
            f"older version); run 'airatings evaluate --run {run.model_version}' again, then "
            "export-onnx"
        )
    if knots.get("target") != target:
        raise InputError(
            f"run {run.model_version}: the recorded calibration is for target "
            f"{knots.get('target')!r}, the checkpoint's is {target!r}; evaluate again"
        )
    return knots


def training_copy_array(path: Path, size: int) -> np.ndarray:
    """A cached training copy as evaluate feeds it: full frame squashed to size x size."""
    from PIL import Image

    from jobs.images import preprocess

    try:
        with Image.open(path, formats=["JPEG", "PNG", "WEBP"]) as img:
            img.load()
            return preprocess(img.convert("RGB"), size)
    except (OSError, ValueError) as exc:
        raise InputError(
            f"cached image {path} cannot be read ({exc}); re-run 'airatings cache'"
        ) from None


def original_array(cfg: Config, path: Path) -> np.ndarray:
    """An original as a scorer sees it: ``load_image`` (the one decode contract), uint8 HWC."""
    from jobs.images import ImageRejected, load_image

    try:
        img = load_image(path, max_pixels=cfg.cache.max_pixels, formats=tuple(cfg.cache.formats))
    except FileNotFoundError:
        raise InputError(f"original image {path} is missing; re-run 'airatings cache'") from None
    except ImageRejected as exc:
        raise InputError(f"original image {path} is refused ({exc})") from None
    return np.array(img, dtype=np.uint8)  # a writable copy (torch.from_numpy wants one)


def training_copy_raw(model: nn.Module, target: str, files: list[Path], size: int) -> np.ndarray:
    """raw_score of the network on training copies (evaluate's path: PIL squash, uint8 NHWC)."""
    import torch

    from jobs.train.model import raw_scores_from_outputs

    out = []
    with torch.inference_mode():
        for start in range(0, len(files), PREDICT_BATCH):
            batch = np.stack(
                [training_copy_array(p, size) for p in files[start : start + PREDICT_BATCH]]
            )
            out.append(
                raw_scores_from_outputs(model(torch.from_numpy(batch)), target).double().numpy()
            )
    return np.concatenate(out) if out else np.zeros(0)


def _stats(values: np.ndarray) -> dict[str, Any]:
    v = np.abs(np.asarray(values, dtype=np.float64))
    if v.size == 0:
        return {"n": 0, "max": None, "p95": None, "mean": None}
    return {
        "n": int(v.size),
        "max": float(v.max()),
        "p95": float(np.percentile(v, 95)),
        "mean": float(v.mean()),
    }


# ---- "already done", checked -----------------------------------------------------------------


def export_key(
    cfg: Config,
    checkpoint_sha: str,
    manifests: dict[str, Path],
    short_side: int,
    knots: dict[str, Any] | None,
) -> str:
    parts = {
        "format": EXPORT_FORMAT,
        "calibration": knots,
        "checkpoint_sha256": checkpoint_sha,
        "manifests": {k: sha256_file(p) for k, p in sorted(manifests.items())},
        "good_threshold": cfg.dataset.good_threshold,
        "short_side": short_side,
        "decode_limits": [cfg.cache.max_pixels, list(cfg.cache.formats)],  # in the metadata
        "tolerance": TOLERANCE_RAW,
    }
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def already_exported(
    run: runs.Run, run_paths: paths.RunPaths, key: str
) -> tuple[dict[str, Any] | None, str]:
    rec = run.params.get("onnx") or {}
    if not run.reached("onnx_exported") or not rec:
        return None, "not exported yet"
    if rec.get("export_key") != key:
        return None, "its inputs changed (checkpoint, manifests, threshold or export format)"
    for path, sha_key in ((run_paths.onnx, "onnx_sha256"), (run_paths.parity, "parity_sha256")):
        if not path.is_file():
            return None, f"{path} is missing"
        if sha256_file(path) != rec.get(sha_key):
            return None, f"{path} changed since export-onnx wrote it"
    return {**rec, "status": "already_done"}, ""


# ---- main ------------------------------------------------------------------------------------


def run(
    cfg: Config,
    run_ref: str | int = "latest",
    *,
    graph_hook: Callable[[onnx.ModelProto], None] | None = None,
) -> dict[str, Any]:
    """Export the best checkpoint of ``run_ref`` (an id, a model version or "latest") to ONNX,
    gate it on parity, record it; returns the summary (also in ``params_json['onnx']``).

    ``graph_hook(model)`` is called on the graph that is about to be checked (after
    simplification, before the metadata and the parity gate); tests perturb it there.
    """
    log = logs.get_logger()
    started = time.monotonic()
    with runs.claim(cfg, "export-onnx", run_ref) as (run, skipped):
        if skipped:
            return skipped
        runs.require(run, "evaluated")
        run_paths = paths.of(cfg).run(run.model_version)
        sweep_temp(run_paths.root, recursive=False)
        best = runs.verified_best_checkpoint(cfg, run, then=", then evaluate and export-onnx again")
        ckpt_sha = sha256_file(best)
        manifests = {s: verified_manifest(cfg, run, s) for s in ("val", "test")}
        short_side = int(
            (run.params.get("cache") or {}).get("train_short_side") or cfg.cache.train_short_side
        )
        key = export_key(
            cfg,
            ckpt_sha,
            manifests,
            short_side,
            (run.params.get("evaluate") or {}).get("calibration"),
        )
        done, why = already_exported(run, run_paths, key)
        if done is not None:
            log.info("onnx_export_already_done", onnx=str(run_paths.onnx))
            return done | {"seconds": round(time.monotonic() - started, 3)}
        if run.reached("registered"):
            raise InputError(
                f"run {run.model_version} is registered but its export {why}; the registered "
                f"copy under {paths.of(cfg).model(run.model_version).root} is the record: "
                f"restore {run_paths.onnx} from it"
            )
        if run.reached("onnx_exported"):
            log.info("onnx_export_redone", reason=why)
        summary, parity_doc, model_bytes = _export_and_check(
            cfg, run, best, ckpt_sha, manifests, short_side, key, graph_hook
        )
        # A lost lock (docs/faults.md 27): a twin may be exporting too; write nothing.
        db.check_locks()
        parity_text = json.dumps(parity_doc, indent=2, sort_keys=True, allow_nan=False)
        atomic_write_text(run_paths.parity, parity_text)

        def written_ok(tmp: Path) -> None:
            check_graph(load_checked(tmp, expected_sha256=summary["onnx_sha256"]))

        with atomic_path(run_paths.onnx, check=written_ok) as tmp:
            tmp.write_bytes(model_bytes)
        summary |= {
            "onnx_path": str(run_paths.onnx),
            "parity_path": str(run_paths.parity),
            "parity_sha256": sha256_bytes(parity_text.encode()),
        }
        with db.connect(cfg) as conn:
            runs.set_status(conn, cfg, run.id, "onnx_exported", step="onnx", summary=summary)
        summary["seconds"] = round(time.monotonic() - started, 3)
        log.info(
            "onnx_exported",
            onnx=str(run_paths.onnx),
            sha256=summary["onnx_sha256"],
            max_abs_delta_raw=summary["parity"]["max_abs_delta_raw"],
            simplified=summary["simplified"]["kept"],
            seconds=summary["seconds"],
        )
        return summary


def _export_and_check(
    cfg: Config,
    run: runs.Run,
    best: Path,
    ckpt_sha: str,
    manifests: dict[str, Path],
    short_side: int,
    key: str,
    graph_hook: Callable[[onnx.ModelProto], None] | None,
) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """Everything before the writes: (summary, parity.json content, the model's bytes)."""
    import onnx
    import onnxruntime
    import onnxsim
    import pyarrow.parquet as pq
    import torch

    from jobs.resources import available_cpus
    from jobs.train import model as train_model

    log = logs.get_logger()
    clock = _Clock()
    threads = cfg.train.threads or available_cpus()
    torch.set_num_threads(threads)
    model, ckpt = train_model.model_from_checkpoint(best)
    if ckpt.get("dataset_hash") != run.dataset_hash:
        raise InputError(
            f"{best} was trained on dataset {ckpt.get('dataset_hash')}, "
            f"the run has {run.dataset_hash}"
        )
    spec = ckpt["spec"]
    target, size = spec["target"], int(spec["input_size"])
    threshold = float(cfg.dataset.good_threshold)
    root = cfg.artifacts_dir

    # the calibration evaluate fitted on the validation split (and showed in its report)
    knots = evaluated_calibration(run, target)

    test = pq.read_table(
        manifests["test"], columns=["snapshot_id", "image_path", "train_image_path"]
    ).to_pydict()
    n_test = len(test["snapshot_id"])
    if n_test == 0:
        raise InputError("the test split is empty: no real images to check the export on")
    if any(p is None for p in test["image_path"]):
        raise InputError("the test manifest has rows without image_path (the original)")
    originals = [root / p for p in test["image_path"]]
    copy_ai = calibration.apply(
        knots, training_copy_raw(model, target, [root / p for p in test["train_image_path"]], size)
    )
    near = [int(i) for i in np.argsort(np.abs(copy_ai - threshold), kind="stable")[:NEAR_THRESHOLD]]
    golden = sorted(set(range(min(n_test, GOLDEN_MAX))) | set(near))
    clock.lap("calibrate_s")

    scorer = build_scorer(model, target, short_side, size)
    exported = export_graph(
        scorer, torch.from_numpy(original_array(cfg, originals[golden[0]])[None])
    )
    check_graph(exported)
    clock.lap("export_s")

    batches, shapes = parity_batches(cfg, [originals[i] for i in golden], n_test)
    graph, simplified = simplify(exported, [batches[7][:1], batches[7]], threads)
    clock.lap("simplify_s")
    if graph_hook is not None:
        graph_hook(graph)
    preprocessing = preprocessing_spec(short_side, size, cfg.cache.max_pixels, cfg.cache.formats)
    set_metadata(graph, run, target, preprocessing, knots, threshold, ckpt_sha)
    model_bytes = graph.SerializeToString()

    session = ort_session(model_bytes, threads)
    parity, per_image = parity_gate(
        cfg, scorer, session, [originals[i] for i in golden], batches, knots, threshold
    )
    clock.lap("parity_s")
    ids = [int(test["snapshot_id"][i]) for i in golden]
    position = {i: j for j, i in enumerate(golden)}
    gate = parity["gate"]
    gate["disagreements"] = [ids[j] for j in gate.pop("disagreeing")]
    near_rows = [dict(per_image[position[i]], snapshot_id=ids[position[i]]) for i in near]
    gate["nearest"] = sorted(
        (
            {
                "snapshot_id": r["snapshot_id"],
                "ai_rating_torch": r["ai_rating_torch"],
                "ai_rating_onnx": r["ai_rating_onnx"],
                "margin": r["ai_rating_onnx"] - threshold,
            }
            for r in near_rows
        ),
        key=lambda r: abs(r["margin"]),
    )
    gate["near_threshold_images"] = len(near_rows)

    # one preprocessing implementation: the original through the graph vs the training copy
    # the way evaluate scores it
    ai_onnx = np.array([r["ai_rating_onnx"] for r in per_image])
    ai_copy = copy_ai[golden]
    orig_vs_copy = _stats(ai_onnx - ai_copy) | {
        "gate_disagreements": int(
            np.sum(calibration.gate(ai_copy, threshold) != calibration.gate(ai_onnx, threshold))
        ),
        "what": "|aiRating(original through the graph) - aiRating(training copy, evaluate's "
        "path)| on the golden test images",
    }
    log.info(
        "parity_checked",
        max_abs_delta_raw=parity["max_abs_delta_raw"],
        tolerance=TOLERANCE_RAW,
        gate_identical=gate["identical"],
        golden=len(golden),
        original_vs_copy_max=orig_vs_copy["max"],
    )
    if not parity["max_abs_delta_raw"] <= TOLERANCE_RAW:
        worst = max(parity["batches"], key=lambda b: parity["batches"][b]["max_abs_delta_raw"])
        raise InputError(
            f"parity gate failed: max |raw_score(PyTorch) - raw_score(onnxruntime)| = "
            f"{parity['max_abs_delta_raw']:.3g} (at batch {worst}) is above the tolerance "
            f"{TOLERANCE_RAW:g}; model.onnx was not written"
        )
    if gate["disagreements"]:
        raise InputError(
            f"parity gate failed: the capture gate (aiRating >= {threshold:g}) differs between "
            f"PyTorch and onnxruntime for snapshots {gate['disagreements'][:10]}; model.onnx "
            "was not written"
        )

    summary: dict[str, Any] = {
        "status": "onnx_exported",
        "model_version": run.model_version,
        "export_key": key,
        "checkpoint_sha256": ckpt_sha,
        "onnx_sha256": sha256_bytes(model_bytes),
        "onnx_bytes": len(model_bytes),
        "opset": OPSET,
        "exporter": EXPORTER,
        "target": target,
        "raw_score": RAW_SCORE_MEANING[target],
        "score_mapping": train_model.SCORE_MAPPING[target],
        "io": io_spec(graph),
        "preprocessing": preprocessing,
        "simplified": simplified,
        "parity": parity | {"gate": {k: v for k, v in gate.items() if k != "nearest"}},
        "original_vs_training_copy": orig_vs_copy,
        "calibration": knots,
        "good_threshold": threshold,
        "quantization": "not done: the optional INT8 QDQ step is not implemented",
        "timings": clock.laps,
        "libraries": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "onnxsim": str(onnxsim.__version__),
        },
    }
    parity_doc = {
        "model_version": run.model_version,
        "onnx_sha256": summary["onnx_sha256"],
        "parity": parity,
        "calibration": knots,
        "original_vs_training_copy": orig_vs_copy,
        "images": [
            dict(r, snapshot_id=ids[j], shape=list(shapes[j]), ai_rating_training_copy=c)
            for j, (r, c) in enumerate(zip(per_image, ai_copy.tolist(), strict=True))
        ],
    }
    return summary, parity_doc, model_bytes


class _Clock:
    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._t = time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps[name] = round(now - self._t, 3)
        self._t = now


def set_metadata(
    graph: onnx.ModelProto,
    run: runs.Run,
    target: str,
    preprocessing: dict[str, Any],
    knots: dict[str, Any],
    threshold: float,
    ckpt_sha: str,
) -> None:
    """``metadata_props`` (strings; JSON where structured) and the doc string."""
    import onnx

    from jobs.train.model import SCORE_MAPPING

    onnx.helper.set_model_props(
        graph,
        {
            "model_version": run.model_version,
            "target": target,
            "raw_score": RAW_SCORE_MEANING[target],
            "score_mapping": SCORE_MAPPING[target],
            "preprocessing": json.dumps(preprocessing, sort_keys=True),
            "input_names": json.dumps([INPUT_NAME]),
            "output_names": json.dumps([OUTPUT_NAME]),
            "io": json.dumps(io_spec(graph), sort_keys=True),
            "calibration": json.dumps(knots, sort_keys=True),
            "good_threshold": repr(threshold),
            "dataset_hash": str(run.dataset_hash),
            "checkpoint_sha256": ckpt_sha,
            "exporter": EXPORTER,
            "exported_by": "airatings export-onnx",
        },
    )
    graph.doc_string = (
        f"airatings {run.model_version}: uint8 RGB NHWC image (any size) -> raw_score "
        f"({RAW_SCORE_MEANING[target]}); aiRating = the calibration knots applied to raw_score"
    )


def parity_batches(
    cfg: Config, files: list[Path], n_test: int
) -> tuple[dict[int, np.ndarray], list[tuple[int, ...]]]:
    """Batches of 7 and the largest from originals of one shape (the commonest): real images,
    cycled when there are fewer, at most BATCH_PIXELS pixels a batch. Also every file's shape."""
    shapes = [original_array(cfg, f).shape for f in files]
    common = Counter(shapes).most_common(1)[0][0]
    largest = max(7, min(MAX_BATCH, n_test, BATCH_PIXELS // (common[0] * common[1])))
    same = [f for f, s in zip(files, shapes, strict=True) if s == common][:largest]
    pool = [original_array(cfg, f) for f in same]
    return {b: np.stack([pool[j % len(pool)] for j in range(b)]) for b in (7, largest)}, shapes


def parity_gate(
    cfg: Config,
    scorer: nn.Module,
    session: Any,
    files: list[Path],
    batches: dict[int, np.ndarray],
    knots: dict[str, Any],
    threshold: float,
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """PyTorch eager vs onnxruntime on the golden originals one by one (batch 1) and on the
    batches; raw deltas per batch size and the capture-gate decisions after calibration.
    ``gate['disagreeing']`` holds the positions in ``files`` whose decisions differ."""
    per_image = []
    for f in files:
        x = original_array(cfg, f)[None]
        per_image.append(
            {"raw_torch": float(torch_raw(scorer, x)[0]), "raw_onnx": float(ort_raw(session, x)[0])}
        )
    raw_t = np.array([r["raw_torch"] for r in per_image])
    raw_o = np.array([r["raw_onnx"] for r in per_image])
    ai_t, ai_o = calibration.apply(knots, raw_t), calibration.apply(knots, raw_o)
    for r, a, b in zip(per_image, ai_t.tolist(), ai_o.tolist(), strict=True):
        r["ai_rating_torch"], r["ai_rating_onnx"] = a, b
    by_batch = {"1": {"n": len(files), "max_abs_delta_raw": float(np.max(np.abs(raw_t - raw_o)))}}
    for b, x in batches.items():
        by_batch[str(b)] = {
            "n": b,
            "shape": list(x.shape),
            "max_abs_delta_raw": float(np.max(np.abs(torch_raw(scorer, x) - ort_raw(session, x)))),
        }
    max_delta = max(v["max_abs_delta_raw"] for v in by_batch.values())
    disagreeing = np.flatnonzero(
        calibration.gate(ai_t, threshold) != calibration.gate(ai_o, threshold)
    ).tolist()
    parity = {
        "tolerance": TOLERANCE_RAW,
        "batches": by_batch,
        "max_abs_delta_raw": max_delta,
        "max_abs_delta_ai_rating": float(np.max(np.abs(ai_t - ai_o))),
        "passed": bool(max_delta <= TOLERANCE_RAW and not disagreeing),
        "gate": {
            "threshold": threshold,
            "rule": "aiRating >= threshold",
            "golden_images": len(files),
            "identical": not disagreeing,
            "disagreeing": disagreeing,
        },
    }
    return parity, per_image
