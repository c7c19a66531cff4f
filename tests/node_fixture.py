"""The fixture the Node scorer's tests (clients/node/test/) compare against: what Python's side
says about a registered model and a set of image files.

:func:`write_fixture` writes a folder::

    model/            model.onnx + model_card.json (copied, sha256 checked)
    nan_model/        a tiny graph with the same interface that returns NaN, and its card
    images/           the images under stable names, plus made ones (PNG with alpha, JPEG with
                      EXIF orientation 6, grey JPEG, GIF with transparency and a second frame,
                      lossy WEBP, CMYK JPEG, 16-bit grey PNG) and the bad files (truncated JPEG/PNG/GIF/WEBP, random bytes,
                      a text file, a JPEG signature on garbage)
    tensors/<name>.u8 the uint8 RGB HWC picture ``jobs.images.load_image`` decodes, raw bytes
    reference.json    per image: shape, raw_score (Python onnxruntime on that tensor), aiRating
                      (``jobs.calibration.apply``), gate (``jobs.calibration.gate``); per bad
                      file: the ImageRejected reason; a calibration grid raw -> aiRating

:func:`pick_images` chooses a registered run's real test originals: the first few in manifest
order and those whose aiRating is nearest the threshold. Used by tests/test_node_scorer.py and
scripts/node_fixture.py (one implementation).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs import calibration
from jobs.artifacts import sha256_bytes
from jobs.images import ACCEPTED_FORMATS, EXTENSIONS, ImageRejected, load_image, sniff_format

if TYPE_CHECKING:
    from jobs.config import Config

FORMAT = 1
# The derived pictures are this size: short side above the graph's 256, so its resize runs.
DERIVED_SIZE = (400, 300)


def _session(model_bytes: bytes) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])


def _raw(session: Any, names: tuple[str, str], pixels: np.ndarray) -> float:
    inp, out = names
    return float(session.run([out], {inp: np.ascontiguousarray(pixels[None])})[0][0])


def _names(card: dict[str, Any]) -> tuple[str, str]:
    return card["inputs"][0]["name"], card["outputs"][0]["name"]


def _verified_model(model_dir: Path) -> tuple[bytes, bytes, dict[str, Any]]:
    card_bytes = (model_dir / "model_card.json").read_bytes()
    card = json.loads(card_bytes)
    data = (model_dir / card["file"]).read_bytes()
    if sha256_bytes(data) != card["sha256"]:
        raise ValueError(f"{model_dir / card['file']} does not match its card's sha256")
    return data, card_bytes, card


def pick_images(cfg: Config, version: str, *, first: int = 4, near: int = 4) -> list[Path]:
    """A registered version's test originals (``image_path`` of the run's verified active test
    manifest): the first ``first`` in manifest order, then the ``near`` others whose aiRating
    (onnxruntime on ``load_image``'s picture, then the card's calibration) is nearest the
    card's threshold."""
    import pyarrow.parquet as pq

    from jobs import db, onnx_export, registry, runs

    path, card = registry.load_verified(cfg, version)
    with db.connect(cfg, autocommit=True) as conn:
        run = runs.get_run(conn, cfg, version)
    manifest = onnx_export.verified_manifest(cfg, run, "test")
    rel = pq.read_table(manifest, columns=["image_path"]).column("image_path").to_pylist()
    originals = [cfg.artifacts_dir / p for p in rel]
    session = _session(path.read_bytes())
    names = _names(card)
    formats = tuple(cfg.cache.formats)
    raw = [
        _raw(
            session,
            names,
            np.asarray(load_image(p, max_pixels=cfg.cache.max_pixels, formats=formats)),
        )
        for p in originals
    ]
    margin = np.abs(
        calibration.apply(card["calibration"], raw) - card["threshold_policy"]["threshold"]
    )
    chosen = list(range(min(first, len(originals))))
    rest = [int(i) for i in np.argsort(margin, kind="stable") if int(i) not in chosen]
    return [originals[i] for i in chosen + rest[:near]]


# ---- made images --------------------------------------------------------------------------


def _encode(img: Any, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def derived_images(source: np.ndarray) -> dict[str, bytes]:
    """Pictures in the other formats and modes the decode contract covers, made with Pillow
    from one real picture (scaled to :data:`DERIVED_SIZE`)."""
    from PIL import Image

    base = Image.fromarray(source).resize(DERIVED_SIZE, Image.Resampling.BILINEAR)
    w, h = base.size
    out: dict[str, bytes] = {}

    # RGBA: alpha a left-to-right ramp 0..255, a fully transparent band at the top
    alpha = np.tile(np.linspace(0, 255, w).round().astype(np.uint8), (h, 1))
    alpha[: h // 6] = 0
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.fromarray(alpha, "L"))
    out["alpha.png"] = _encode(rgba, "PNG")

    # EXIF orientation 6 (display rotated 90 degrees clockwise): pixels stored unrotated
    exif = Image.Exif()
    exif[0x0112] = 6
    out["exif6.jpg"] = _encode(base, "JPEG", quality=90, exif=exif.tobytes())

    out["grey.jpg"] = _encode(base.convert("L"), "JPEG", quality=90)

    # GIF: palette, index 255 transparent over the bottom-right quarter, and a second frame
    # (inverted) that must not be the one scored
    first = base.quantize(colors=255)
    pal = np.array(first, dtype=np.uint8)
    pal[h // 2 :, w // 2 :] = 255
    frame0 = Image.fromarray(pal, "P")
    frame0.putpalette(first.getpalette())
    frame1 = Image.fromarray(255 - np.asarray(base)).quantize(colors=255)
    out["anim.gif"] = _encode(
        frame0, "GIF", save_all=True, append_images=[frame1], transparency=255, duration=100, loop=0
    )

    out["lossy.webp"] = _encode(base, "WEBP", quality=80)

    # CMYK (Pillow's own conversion, no colour profile) and 16-bit greyscale (I;16, scaled)
    out["cmyk.jpg"] = _encode(base.convert("CMYK"), "JPEG", quality=90)
    grey = np.asarray(base.convert("L"), dtype=np.uint16) * 257
    grey += (np.arange(w, dtype=np.uint16) % 251)[None, :]  # low bytes that matter when scaled
    out["grey16.png"] = _encode(Image.fromarray(grey), "PNG")
    return out


def bad_files(jpeg: bytes, png: bytes, gif: bytes, webp: bytes, seed: int = 7) -> dict[str, bytes]:
    """Bytes ``load_image`` refuses."""
    rng = np.random.default_rng(seed)
    return {
        "truncated.jpg": jpeg[: len(jpeg) * 6 // 10],
        "truncated.png": png[: len(png) * 6 // 10],
        "truncated.gif": gif[: len(gif) // 4],  # inside the first of its two frames
        "truncated.webp": webp[: len(webp) * 6 // 10],
        "random.bin": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "text.txt": b"<html><body>404 Not Found</body></html>\n",
        # a real JPEG's first 20 bytes (SOI, APP0), then noise where the markers should be
        "garbage.jpg": jpeg[:20] + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    }


def nan_model(card: dict[str, Any], out: Path) -> None:
    """``out/model.onnx``: the card's interface (uint8 NHWC in, float32 (batch,) out), every
    raw_score NaN; ``out/model_card.json``: the card with this file's sha256."""
    import onnx
    from onnx import TensorProto, helper

    inp, outp = _names(card)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", [inp], ["f"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["f", "axes"], ["m"], keepdims=0),
            helper.make_node("Mul", ["m", "nan"], [outp]),
        ],
        "nan_scorer",
        [helper.make_tensor_value_info(inp, TensorProto.UINT8, ["batch", "height", "width", 3])],
        [helper.make_tensor_value_info(outp, TensorProto.FLOAT, ["batch"])],
        initializer=[
            helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3]),
            helper.make_tensor("nan", TensorProto.FLOAT, [], [float("nan")]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    data = model.SerializeToString()
    out.mkdir(parents=True)
    (out / "model.onnx").write_bytes(data)
    nan_card = dict(card, model_version=f"{card['model_version']}_nan", sha256=sha256_bytes(data))
    nan_card["bytes"] = len(data)
    (out / "model_card.json").write_text(json.dumps(nan_card, indent=2, sort_keys=True) + "\n")


def calibration_grid(knots: dict[str, Any]) -> list[float]:
    """Raw scores below the first knot, above the last, on every knot, between knots, and a
    regular grid across the range."""
    x = np.asarray(knots["x"], dtype=np.float64)
    lo, hi = float(x[0]), float(x[-1])
    grid = [lo - 100.0, lo - 1.0, lo - 1e-9, hi + 1e-9, hi + 1.0, hi + 100.0]
    grid += x.tolist() + ((x[:-1] + x[1:]) / 2).tolist()
    grid += np.linspace(lo - 0.5, hi + 0.5, 101).tolist()
    return [float(v) for v in grid]


# ---- the fixture --------------------------------------------------------------------------


def write_fixture(
    model_dir: Path, images: list[Path], out: Path, *, max_pixels: int
) -> dict[str, Any]:
    """Write the fixture (module doc) for the registered model in ``model_dir`` and the image
    files ``images`` (the first must decode; the made images come from it) into ``out``, which
    must not exist. Returns reference.json's content."""
    model_bytes, card_bytes, card = _verified_model(model_dir)
    knots = card["calibration"]
    threshold = float(card["threshold_policy"]["threshold"])
    names = _names(card)
    session = _session(model_bytes)

    out.mkdir(parents=True)
    (out / "model").mkdir()
    (out / "model" / card["file"]).write_bytes(model_bytes)
    (out / "model" / "model_card.json").write_bytes(card_bytes)
    nan_model(card, out / "nan_model")
    for sub in ("images", "tensors"):
        (out / sub).mkdir()

    files: dict[str, bytes] = {}
    for i, path in enumerate(images):
        data = Path(path).read_bytes()
        fmt = sniff_format(data[:16])
        if fmt is None:
            raise ValueError(f"{path} is not an image")
        files[f"orig{i:02d}.{EXTENSIONS[fmt]}"] = data
    source = np.asarray(load_image(next(iter(files.values())), max_pixels=max_pixels))
    files.update(derived_images(source))

    entries = []
    for name, data in files.items():
        (out / "images" / name).write_bytes(data)
        pixels = np.asarray(load_image(data, max_pixels=max_pixels), dtype=np.uint8)
        (out / "tensors" / f"{name}.u8").write_bytes(pixels.tobytes())
        raw = _raw(session, names, pixels)
        ai = float(calibration.apply(knots, raw))
        entries.append(
            {
                "name": name,
                "file": f"images/{name}",
                "format": sniff_format(data[:16]),
                "tensor": f"tensors/{name}.u8",
                "shape": list(pixels.shape),
                "raw_score": raw,
                "ai_rating": ai,
                "gate": bool(calibration.gate(ai, threshold)),
                "margin": ai - threshold,
            }
        )

    jpeg = files[next(n for n in files if n.endswith(".jpg"))]
    bad = bad_files(jpeg, files["alpha.png"], files["anim.gif"], files["lossy.webp"])
    for name, data in bad.items():
        (out / "images" / name).write_bytes(data)
    # (name, file, pixel cap, formats): the bad files, then a good image under a pixel cap below
    # its size and a PNG under a format list without PNG
    cases = [(name, name, max_pixels, ACCEPTED_FORMATS) for name in bad]
    cases.append(("orig00_capped", entries[0]["name"], 1024, ACCEPTED_FORMATS))
    cases.append(("png_not_accepted", "alpha.png", max_pixels, ("JPEG",)))
    rejects = []
    for name, file, cap, formats in cases:
        try:
            load_image(out / "images" / file, max_pixels=cap, formats=formats)
        except ImageRejected as exc:
            reason = exc.reason
        else:
            raise AssertionError(f"{name}: load_image accepted it")
        rejects.append(
            {
                "name": name,
                "file": f"images/{file}",
                "max_pixels": cap,
                "formats": list(formats),
                "reason": reason,
            }
        )

    grid = calibration_grid(knots)
    import onnxruntime
    import PIL

    reference = {
        "fixture_format": FORMAT,
        "model_version": card["model_version"],
        "model_dir": "model",
        "nan_model_dir": "nan_model",
        "threshold": threshold,
        "max_pixels": max_pixels,
        "images": entries,
        "rejects": rejects,
        "calibration_grid": {
            "knots": {"x": knots["x"], "y": knots["y"]},
            "raw": grid,
            "ai_rating": calibration.apply(knots, grid).tolist(),
        },
        "python": {"pillow": PIL.__version__, "onnxruntime": onnxruntime.__version__},
    }
    (out / "reference.json").write_text(json.dumps(reference, indent=2, allow_nan=False) + "\n")
    return reference
