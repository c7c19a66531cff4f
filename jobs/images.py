"""The one image contract: decode -> validate -> normalise -> preprocess.

Cache, training-eval, ONNX verification and scoring all call these functions; the Node scorer
mirrors ``preprocess`` from the model card.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Preprocessing contract (recorded in the model card): the full frame, no centre crop (the
# sky's edges matter), resized (aspect not kept) to size x size with bilinear filtering, RGB
# uint8 HWC. Normalisation (ImageNet mean/std) happens inside the model / ONNX graph.
RESAMPLE = Image.Resampling.BILINEAR
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocess(img: Image.Image, size: int) -> np.ndarray:
    """A normalised RGB picture -> (size, size, 3) uint8, full frame, bilinear."""
    if img.mode != "RGB":
        raise ValueError(f"preprocess expects a normalised RGB image, got mode {img.mode}")
    if img.size != (size, size):
        img = img.resize((size, size), RESAMPLE)
    return np.asarray(img, dtype=np.uint8)


# ---- decode -> validate -> normalise ---------------------------------------------------------
#
# Images come from URLs in a database people write to: every body is untrusted. ``load_image``
# is the one gate (docs/faults.md 13-15): magic bytes first, then Pillow restricted to the
# formats we accept, a pixel cap of our own checked on the header before any pixel is decoded,
# DecompressionBombWarning raised as an error, a full ``load()`` (``verify()`` passes truncated
# JPEGs), EXIF orientation applied, and every mode normalised to the same 3-channel uint8 RGB.
# Never turn on ``ImageFile.LOAD_TRUNCATED_IMAGES`` nor switch off ``Image.MAX_IMAGE_PIXELS``.

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
# Transparent pixels are composited on this fixed background (recorded with the preprocessing
# contract so the Node scorer does the same), not dropped by convert('RGB').
BACKGROUND_RGB = (255, 255, 255)
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}

# Why an image was refused; these strings are recorded in failures.parquet.
REASONS = ("not_an_image", "unsupported_format", "truncated", "decompression_bomb", "corrupt")


class ImageRejected(Exception):
    """The bytes are not an acceptable picture. ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def sniff_format(head: bytes) -> str | None:
    """The image format from the first bytes (magic numbers), or None if not a known image."""
    if head[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


# SOFn markers (frame headers) that carry the picture's size: C0-CF except DHT (C4), JPG (C8)
# and DAC (CC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """A JPEG file's (width, height) from its frame header, walking the marker segments
    without decoding anything (a few small reads); None if no frame header is found."""
    with open(path, "rb") as f:
        if f.read(2) != b"\xff\xd8":
            return None
        while True:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0xFF:
                return None
            marker, length = head[1], int.from_bytes(head[2:4], "big")
            if marker == 0xFF:  # fill byte: the marker starts one byte later
                f.seek(-3, os.SEEK_CUR)
                continue
            if marker in _SOF_MARKERS:
                frame = f.read(5)  # precision, height, width
                if len(frame) < 5:
                    return None
                return int.from_bytes(frame[3:5], "big"), int.from_bytes(frame[1:3], "big")
            if marker == 0xDA or length < 2:  # scan data before any frame header: broken
                return None
            f.seek(length - 2, os.SEEK_CUR)


def _draft_target(size: tuple[int, int], short_side: int) -> tuple[int, int]:
    """(w, h) scaled so the shorter side is ``short_side``, in exact integer arithmetic (the
    ONNX graph computes ``w * short_side // min(w, h)`` the same way; a float product gave
    255 for 322x572)."""
    w, h = size
    m = min(w, h)
    return max(1, w * short_side // m), max(1, h * short_side // m)


_GREY_WIDE = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_BAND_PIXELS = 1 << 16  # pixels per band when scaling wide greyscale (a 512 KB float64 band)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded mode -> 3-channel uint8 RGB (the one normalisation shared by all callers).

    16-bit and 32-bit greyscale are scaled (not clipped) to 8 bits; transparency (RGBA, LA, PA,
    P with a transparent index) is composited on ``BACKGROUND_RGB``; CMYK, YCbCr, L, 1 and P
    are converted by Pillow.

    Memory: at the pixel cap a picture is tens of megapixels, decoded in a thread pool, so no
    step here holds more than the source and the result at full size: wide greyscale is
    scaled a band of rows at a time into one uint8 plane (float64 only per band), and
    transparency is blended into the background image in place (``paste`` with the alpha as
    the mask), not through full-size RGBA copies.
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _GREY_WIDE:
        return _wide_grey_to_l(img).convert("RGB")
    has_alpha = (
        mode in ("RGBA", "LA", "PA", "RGBa", "La")
        or (mode == "P" and "transparency" in img.info)
        or (mode in ("L", "RGB") and "transparency" in img.info)
    )
    if has_alpha:
        rgba = img if mode == "RGBA" else img.convert("RGBA")
        out = Image.new("RGB", rgba.size, BACKGROUND_RGB)
        # out = src * a + background * (1 - a), in out's own memory: the background is opaque,
        # so this is alpha compositing onto it (alpha_composite's result to within rounding).
        out.paste(rgba, (0, 0), rgba)
        return out
    return img.convert("RGB")


def _wide_grey_to_l(img: Image.Image) -> Image.Image:
    """I;16 (scaled by 65535), I and F (by their maximum, I at least 255) -> L, rounded."""
    mode = img.mode
    if mode.startswith("I;16"):
        top = 65535.0
    else:
        top = max(float(img.getextrema()[1]), 0.0, 1.0)  # type: ignore[arg-type,index]
        if mode != "F" and top <= 255:
            top = 255.0
    w, h = img.size
    out = np.empty((h, w), dtype=np.uint8)
    rows = max(1, _BAND_PIXELS // w)
    for y0 in range(0, h, rows):
        y1 = min(h, y0 + rows)
        band = np.asarray(img.crop((0, y0, w, y1)), dtype=np.float64)
        band /= top  # the same operations, in the same order, as on the whole array
        band *= 255.0
        band += 0.5
        np.clip(band, 0, 255, out=band)
        out[y0:y1] = band  # truncates toward zero, like astype(uint8)
    return Image.fromarray(out, "L")


class Decoded(NamedTuple):
    """A normalised picture and the size its header declares (what the pixel cap counts; a
    draft decode makes ``image`` smaller, EXIF orientation may swap its sides)."""

    image: Image.Image
    width: int
    height: int


def load_image(
    data: bytes | str | os.PathLike,
    *,
    max_pixels: int,
    formats: tuple[str, ...] | list[str] = ACCEPTED_FORMATS,
    draft_short_side: int | None = None,
) -> Image.Image:
    """Decode, validate and normalise one untrusted image -> an RGB ``PIL.Image``.

    ``data`` is the raw bytes or a path to them. ``draft_short_side`` lets JPEG decode at a
    reduced DCT scale whose shorter side is still >= that many pixels (``Image.draft``): the
    whole bitstream is still entropy-decoded, so truncation is caught, at a fraction of the
    cost. Raises ``ImageRejected(reason)``.
    """
    return decode_image(
        data, max_pixels=max_pixels, formats=formats, draft_short_side=draft_short_side
    ).image


def pixel_cap(max_pixels: int) -> int:
    """The pixel limit ``load_image`` applies: ours, and never above Pillow's own."""
    return min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)


def decode_image(
    data: bytes | str | os.PathLike,
    *,
    max_pixels: int,
    formats: tuple[str, ...] | list[str] = ACCEPTED_FORMATS,
    draft_short_side: int | None = None,
) -> Decoded:
    """``load_image``, also returning the header's width and height."""
    if isinstance(data, bytes | bytearray | memoryview):
        head = bytes(data[:16])
        fp: Any = io.BytesIO(data)
    else:
        with open(data, "rb") as f:
            head = f.read(16)
        fp = data
    fmt = sniff_format(head)
    if fmt is None:
        raise ImageRejected("not_an_image", "no known image signature")
    if fmt not in formats:
        raise ImageRejected("unsupported_format", f"{fmt} is not accepted")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(fp, formats=list(formats)) as opened:
                img = opened
                w, h = img.size
                if w < 1 or h < 1:
                    raise ImageRejected("corrupt", f"size {w}x{h}")
                # Never above Pillow's own limit either: ``warnings.catch_warnings`` is not
                # thread-safe (the cache decodes in a thread pool), so another thread leaving
                # its block can drop the "error" filter and DecompressionBombWarning would
                # only warn. This check does not depend on the warning filter.
                cap = pixel_cap(max_pixels)
                if w * h > cap:
                    raise ImageRejected("decompression_bomb", f"{w}x{h} is over {cap} pixels")
                if getattr(img, "n_frames", 1) > 1:
                    img.seek(0)  # animated: the first frame
                if draft_short_side and img.format == "JPEG" and min(w, h) > draft_short_side:
                    img.draft("RGB", _draft_target((w, h), draft_short_side))
                img.load()
                # in place: without it exif_transpose returns a full copy even when there is
                # nothing to turn
                ImageOps.exif_transpose(img, in_place=True)
                out = to_rgb(img)
                return Decoded(out.copy() if out is opened else out, w, h)
        except ImageRejected:
            raise
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise ImageRejected("decompression_bomb", str(exc)) from None
        except UnidentifiedImageError as exc:
            raise ImageRejected("not_an_image", str(exc)) from None
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError) as exc:
            text = str(exc)
            # "image file is truncated", "Truncated File Read" (a segment cut off), EOF
            lowered = text.lower()
            if "truncated" in lowered or isinstance(exc, EOFError) or "end of file" in lowered:
                raise ImageRejected("truncated", text) from None
            raise ImageRejected("corrupt", text) from None


def resize_short_side(img: Image.Image, short_side: int) -> Image.Image:
    """Scale so the shorter side is ``short_side`` (never upscales), aspect kept."""
    w, h = img.size
    if min(w, h) <= short_side:
        return img
    # Bilinear (antialiased when shrinking in Pillow) like the preprocessing contract; the
    # training pipeline resizes this copy again, so a costlier filter buys nothing measurable.
    return img.resize(_draft_target((w, h), short_side), RESAMPLE)


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    """JPEG bytes of ``img``: baseline, no optimisation pass.

    At quality >= 90 chroma is halved horizontally only (4:2:2): a 16:9 training copy with
    short side 256 keeps 228 chroma columns and all 256 rows, more than the squash to a
    224 x 224 model input takes from it, and libjpeg-turbo decodes it in ~70% of the time of
    4:4:4 (and 2/3 of the bytes). Decoding is the training input pipeline's main cost
    (bench_train.py), paid once per image per epoch. Below 90, 4:2:0."""
    buf = io.BytesIO()
    img.save(
        buf,
        "JPEG",
        quality=quality,
        optimize=False,
        subsampling="4:2:2" if quality >= 90 else "4:2:0",
    )
    return buf.getvalue()
