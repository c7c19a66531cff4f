"""jobs.images: the one decode -> validate -> normalise contract."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from cache_fixtures import encode, gradient, jpeg, odd_images
from PIL import Image, ImageFile

from jobs.images import (
    BACKGROUND_RGB,
    ImageRejected,
    load_image,
    preprocess,
    resize_short_side,
    sniff_format,
    to_rgb,
)

REPO = Path(__file__).resolve().parents[1]
BIG = 10**8


@pytest.mark.parametrize("name", sorted(odd_images()))
def test_every_mode_becomes_rgb_uint8(name: str) -> None:
    img = load_image(odd_images()[name], max_pixels=BIG)
    assert img.mode == "RGB"
    arr = preprocess(img, 32)
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8


def test_exif_orientation_is_applied() -> None:
    img = load_image(odd_images()["exif_rotated.jpg"], max_pixels=BIG)
    assert img.size == (40, 80)  # stored 80x40 with orientation 6


def test_transparency_is_composited_on_the_fixed_background() -> None:
    rgba = load_image(odd_images()["rgba.png"], max_pixels=BIG)
    assert rgba.getpixel((60, 10)) == BACKGROUND_RGB  # fully transparent red -> background
    assert rgba.getpixel((5, 10)) == (0, 0, 255)  # opaque blue stays
    p = load_image(odd_images()["p_transparent.png"], max_pixels=BIG)
    assert p.getpixel((5, 5)) == BACKGROUND_RGB  # transparent palette index
    assert p.getpixel((60, 5)) == (255, 0, 0)
    # an RGB PNG with a transparent colour key (tRNS): that colour is transparent too
    keyed = Image.new("RGB", (4, 2), (10, 20, 30))
    keyed.putpixel((0, 0), (200, 100, 50))
    out = load_image(encode(keyed, "PNG", transparency=(10, 20, 30)), max_pixels=BIG)
    assert out.mode == "RGB" and out.getpixel((1, 1)) == BACKGROUND_RGB
    assert out.getpixel((0, 0)) == (200, 100, 50)


def test_16_bit_is_scaled_not_clipped() -> None:
    img = load_image(odd_images()["i16.png"], max_pixels=BIG)
    row = [img.getpixel((x, 0))[0] for x in (0, 32, 63)]
    assert row[0] == 0 and 100 < row[1] < 160 and row[2] > 230  # 0, 32000, 63000 of 65535


def test_animated_gif_gives_the_first_frame() -> None:
    img = load_image(odd_images()["animated.gif"], max_pixels=BIG)
    assert img.getpixel((0, 0)) == (0, 0, 0)  # frame 0 is palette index 0 (black)


def test_cmyk_becomes_rgb() -> None:
    src = gradient(320, 200, 1)
    img = load_image(odd_images()["cmyk.jpg"], max_pixels=BIG)
    diff = np.abs(np.asarray(img, dtype=int) - np.asarray(src, dtype=int)).mean()
    assert diff < 20


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"<html><body>oops</body></html>", "not_an_image"),
        (b'{"error": "not found"}', "not_an_image"),
        (b"", "not_an_image"),
        (jpeg(400, 300)[:3000], "truncated"),
        # cut inside the headers: Pillow says "Truncated File Read" (capital T)
        (jpeg(400, 300)[:200], "truncated"),
        (b"\xff\xd8\xff\xe0" + b"\0" * 200, "not_an_image"),  # signature, no picture
        (encode(gradient(20, 20), "BMP"), "not_an_image"),
        (encode(gradient(20, 20), "TIFF"), "not_an_image"),
    ],
)
def test_rejections_have_reasons(data: bytes, reason: str) -> None:
    with pytest.raises(ImageRejected) as err:
        load_image(data, max_pixels=BIG)
    assert err.value.reason == reason


def test_truncated_is_caught_in_draft_mode_too() -> None:
    with pytest.raises(ImageRejected) as err:
        load_image(jpeg(1200, 800)[:20000], max_pixels=BIG, draft_short_side=128)
    assert err.value.reason == "truncated"


def test_format_allow_list() -> None:
    with pytest.raises(ImageRejected) as err:
        load_image(odd_images()["animated.gif"], max_pixels=BIG, formats=("JPEG", "PNG"))
    assert err.value.reason == "unsupported_format"


def test_pixel_cap_of_our_own() -> None:
    with pytest.raises(ImageRejected) as err:
        load_image(jpeg(1000, 1000), max_pixels=999_999)
    assert err.value.reason == "decompression_bomb"
    assert load_image(jpeg(1000, 1000), max_pixels=1_000_000).size == (1000, 1000)


def test_pillow_bomb_warning_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow warns between MAX_IMAGE_PIXELS and twice that; we refuse instead of decoding.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageRejected) as err:
        load_image(encode(gradient(40, 40), "PNG"), max_pixels=BIG)
    assert err.value.reason == "decompression_bomb"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pillow_limit_holds_without_the_warning_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    # catch_warnings is not thread-safe: a decode thread may run while another thread has just
    # restored the filters. Simulate a lost "error" filter; the pixel check must still refuse.
    import jobs.images

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    monkeypatch.setattr(jobs.images.warnings, "simplefilter", lambda *a, **k: None)
    with pytest.raises(ImageRejected) as err:
        load_image(encode(gradient(40, 40), "PNG"), max_pixels=BIG)
    assert err.value.reason == "decompression_bomb"


def test_draft_decode_keeps_the_short_side_at_least_the_target() -> None:
    img = load_image(jpeg(2000, 1200), max_pixels=BIG, draft_short_side=256)
    assert min(img.size) >= 256 and img.size[0] < 2000  # reduced by DCT scaling
    small = resize_short_side(img, 256)
    assert min(small.size) == 256 and abs(small.size[0] / small.size[1] - 2000 / 1200) < 0.01


def test_sniff_and_to_rgb_basics() -> None:
    assert sniff_format(jpeg(8, 8)) == "JPEG"
    assert sniff_format(b"GIF89a....") == "GIF"
    assert sniff_format(b"RIFF\0\0\0\0WEBPVP8 ") == "WEBP"
    assert sniff_format(b"%PDF-1.4") is None
    assert to_rgb(Image.new("LA", (2, 2), (10, 0))).getpixel((0, 0)) == BACKGROUND_RGB


def test_no_module_disables_pillow_safety() -> None:
    """Guard: nothing in the project turns off truncation or bomb checks (docs/faults.md 13)."""
    bad = [
        re.compile("LOAD_TRUNCATED" + r"_IMAGES\s*=\s*True"),
        re.compile("MAX_IMAGE" + r"_PIXELS\s*=\s*(None|0\b)"),
    ]
    offenders = []
    for folder in ("jobs", "tests", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8", errors="replace")
            offenders += [f"{path.relative_to(REPO)}: {p.pattern}" for p in bad if p.search(text)]
    assert offenders == []
    import jobs.cache  # noqa: F401  (importing the users must not flip the globals either)
    import jobs.fetch  # noqa: F401

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS > 0


# ---- normalisation without full-size copies ------------------------------------------------


def _reference_rgb(img: Image.Image) -> np.ndarray:
    """The normalisation as first written (float64 over the whole picture, alpha_composite on
    a full-size background): the oracle the lean ``to_rgb`` must reproduce."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(arr.max(initial=0.0)), 1.0)
        if mode != "F" and not mode.startswith("I;16") and top <= 255:
            top = 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.asarray(Image.fromarray(arr, "L").convert("RGB"))
    if mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND_RGB, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def _modes() -> dict[str, Image.Image]:
    rng = np.random.default_rng(3)
    h, w = 37, 53  # odd sizes: bands and rows do not divide evenly
    u16 = rng.integers(0, 65536, (h, w), dtype=np.uint16)
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    rgba[0, :, 3], rgba[1, :, 3] = 0, 255  # fully transparent and opaque rows too
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    p = Image.fromarray(rng.integers(0, 4, (h, w), dtype=np.uint8), "L").convert("P")
    p.info["transparency"] = 2
    grey_t = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    grey_t.info["transparency"] = 7
    out = {
        "I;16": Image.frombytes("I;16", (w, h), u16.astype("<u2").tobytes()),
        "I;16B": Image.frombytes("I;16B", (w, h), u16.astype(">u2").tobytes()),
        "I": Image.fromarray(rng.integers(-5, 70000, (h, w), dtype=np.int32), "I"),
        "I_small": Image.fromarray(rng.integers(0, 200, (h, w), dtype=np.int32), "I"),
        "F": Image.fromarray(rng.normal(100, 80, (h, w)).astype(np.float32), "F"),
        "RGBA": Image.fromarray(rgba, "RGBA"),
        "LA": la,
        "PA": Image.fromarray(rgba, "RGBA").convert("PA"),
        "P_transparent": p,
        "L_transparent": grey_t,
        "CMYK": gradient(w, h, 2).convert("CMYK"),
        "L": grey_t.copy(),
        "1": grey_t.convert("1"),
    }
    out["L"].info.clear()
    return out


@pytest.mark.parametrize("mode", sorted(_modes()))
def test_lean_normalisation_keeps_the_pixels(mode: str) -> None:
    img = _modes()[mode]
    got = np.asarray(to_rgb(img), dtype=np.int16)
    want = _reference_rgb(img).astype(np.int16)
    assert got.shape == want.shape == (37, 53, 3)
    if mode in ("RGBA", "LA", "PA", "P_transparent", "L_transparent"):
        # paste-with-mask and alpha_composite round differently by at most one level
        assert np.abs(got - want).max() <= 1
        assert (got == want).mean() > 0.5
    else:
        assert np.array_equal(got, want)


_PEAK_SCRIPT = r"""
import io, json, re, sys
import numpy as np
from PIL import Image
from jobs.images import load_image

mode, w, h = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
y, x = np.mgrid[0:h, 0:w]
if mode == "I;16":
    img = Image.frombytes("I;16", (w, h), ((x * 7 + y * 13) % 65536).astype("<u2").tobytes())
else:
    arr = np.stack([x % 256, y % 256, (x + y) % 256, (x * y) % 256], -1).astype(np.uint8)
    img = Image.fromarray(arr, "RGBA")
    del arr
buf = io.BytesIO()
img.save(buf, "PNG", compress_level=1)
data = buf.getvalue()
del img, x, y, buf

def status(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) restarts from the current resident size
base = status("VmRSS")
out = load_image(data, max_pixels=w * h)
assert out.mode == "RGB" and out.size == (w, h)
print(json.dumps({"peak": status("VmHWM") - base, "rgb": 3 * w * h}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("mode", ["I;16", "RGBA"])
def test_a_picture_at_the_pixel_cap_is_normalised_without_full_size_copies(mode: str) -> None:
    """Peak memory of decoding + normalising one 16-bit or RGBA picture at the cap stays within
    a few times its uint8 RGB size (the decoded source and the result; no float64 copy of the
    whole picture, no chain of full-size RGBA images). Measured as the process's peak resident
    size (VmHWM, reset just before): Pillow's pixel buffers are invisible to tracemalloc."""
    import json
    import os
    import subprocess
    import sys

    w, h = 3000, 2000  # 6 MP, an RGB size of 18 MB
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, mode, str(w), str(h)],
        cwd=REPO,
        # big blocks come from mmap and go back at free: the peak is what was live at once
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    # source (2-4 bytes/px) + result (Pillow's RGB is 4 bytes/px) ~ 2-2.7x; the first
    # version held 7-9x (float64 copies; four full-size RGBA images)
    assert got["peak"] < 3.5 * got["rgb"], got


def test_jpeg_size_reads_the_frame_header(tmp_path: Path) -> None:
    """The cache's index re-check reads a JPEG's size from its frame header: the same size
    Pillow reports, past EXIF and other segments, baseline or progressive; None for junk."""
    from jobs.images import jpeg_size

    exif = Image.Exif()
    exif[0x0112] = 6
    cases = {
        "plain.jpg": jpeg(321, 123),
        "exif.jpg": encode(gradient(80, 40, 2), "JPEG", exif=exif.tobytes()),
        "progressive.jpg": encode(gradient(99, 77, 1), "JPEG", progressive=True),
        "cmyk.jpg": odd_images()["cmyk.jpg"],
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with Image.open(path) as im:
            assert jpeg_size(path) == im.size, name
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\0" * 20)
    assert jpeg_size(tmp_path / "junk.jpg") is None
    (tmp_path / "png.jpg").write_bytes(encode(gradient(8, 8), "PNG"))
    assert jpeg_size(tmp_path / "png.jpg") is None


def test_short_side_resize_lands_exactly_on_the_short_side():
    """Float rounding made a 322x572 picture 255 px short instead of 256; the ONNX graph's
    integer arithmetic gives 256, and the training copy must agree with it."""
    from PIL import Image

    from jobs.images import resize_short_side

    for size in [(322, 572), (572, 322), (640, 360), (1280, 719), (333, 999)]:
        out = resize_short_side(Image.new("RGB", size), 256)
        w, h = size
        assert min(out.size) == 256, (size, out.size)
        assert out.size == (w * 256 // min(w, h), h * 256 // min(w, h))
