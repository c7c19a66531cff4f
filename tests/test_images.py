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
    """Guard: nothing in the project turns off truncation or bomb checks (RELIABILITY.md 13)."""
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
