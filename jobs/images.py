"""The one image contract: decode -> validate -> normalise -> preprocess.

Cache, training-eval, ONNX verification and scoring all call these functions; the Node scorer
mirrors ``preprocess`` from the model card.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

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
