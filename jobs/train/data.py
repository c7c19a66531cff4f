"""Training data: the run's active manifests and the cached training-size JPEGs.

Reads ``<artifacts>/runs/<model_version>/active/manifest_{train,val,test}.parquet`` (written by
``airatings cache``, each verified against the sha256 the cache step recorded in the run's
``params_json['cache']['active_files']``) and the ``train_image_path`` copies (shorter side
``cache.train_short_side``).

Targets per ``train.target``:

- ``regression``: ``label_value`` (0..5).
- ``binary``: ``is_good`` (``label_value >= dataset.good_threshold``, computed by the export).
- ``distribution``: a smoothed rating histogram over 0..5 (NIMA). A snapshot has a handful of
  ratings, so its raw histogram is mostly empty bins. Each person's rating r is replaced by a
  discrete Gaussian over the bins, exp(-(k - r)^2 / (2 sigma^2)) normalised over k = 0..5
  (``train.hist_smoothing_sigma``, default 0.5 rating steps: a "4" puts ~78% on 4 and ~11% on
  3 and 5), and the kernels are averaged. Labels from a manual review (or rows without a
  histogram) use ``label_value`` split linearly between its two neighbouring bins, smoothed
  the same way. At the edges the truncation pulls the mean slightly inwards (a lone 5 becomes
  ~4.88 with sigma 0.5); sigma 0 keeps the raw histogram.

Sample weights (``train.sample_weighting``): ``sqrt_count`` weighs a row by sqrt(rating_count),
normalised to mean 1 over the training split, so a label backed by 9 people counts 3x one
backed by 1; ``none`` weighs all rows equally.

Preprocessing follows ``jobs.images.preprocess`` (full frame squashed to a square, bilinear,
uint8 HWC). Training adds a mild random-resized crop that keeps most of the frame (scale
``aug_min_scale``..1, aspect ratio within ``aug_ratio_jitter`` of the frame's, then squashed
like the full frame), a horizontal flip and light brightness/contrast jitter. No hue or
saturation jitter: colour is what people rate. Randomness comes only from torch's RNG. The
engine gives the dataset each epoch's seed (``set_epoch_seed``) and row i of that epoch draws
its augmentation from seed (epoch seed, i) alone: the same picture whichever process, worker
or rank decodes it, in whatever order, so a run on N ranks augments as a run on one does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from jobs import images, paths
from jobs.errors import InputError

_LUMA = torch.tensor([0.299, 0.587, 0.114])

if TYPE_CHECKING:
    import pyarrow as pa

    from jobs.config import Config
    from jobs.runs import Run

SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = (
    "snapshot_id",
    "label_value",
    "label_source",
    "is_good",
    "rating_count",
    "rating_hist",
    "train_image_path",
)


class DataProblem(InputError):
    """The run's data cannot train a model (empty, single-valued, bad labels): run fails."""


def active_dir(cfg: Config, model_version: str) -> Path:
    return paths.of(cfg).run(model_version).active_dir


def _recache_hint(run: Run) -> str:
    return (
        f"re-run 'airatings cache --run {run.model_version}' (or 'airatings cache --merge --run "
        f"{run.model_version}' for a sharded cache): it rewrites the active manifests from the "
        "image cache without downloading"
    )


def verify_active_manifest(cfg: Config, run: Run, split: str) -> Path:
    """The run's active manifest for ``split``, checked against the sha256 the cache step
    recorded in ``params_json['cache']['active_files']`` when it wrote it (docs/faults.md 31).
    Missing, unrecorded or changed: InputError (exit 2) naming the file and the fix."""
    from jobs.artifacts import sha256_file

    path = paths.of(cfg).run(run.model_version).active_manifest(split)
    if not path.is_file():
        raise InputError(
            f"{path} is missing: run 'airatings cache --run {run.model_version}' first"
        )
    recorded = ((run.params.get("cache") or {}).get("active_files") or {}).get(path.name) or {}
    expected = recorded.get("sha256")
    if not expected:
        raise InputError(
            f"{path}: run {run.model_version}'s cache record holds no sha256 for it (cached "
            f"before manifests were checksummed, or not by 'airatings cache'); {_recache_hint(run)}"
        )
    actual = sha256_file(path)
    if actual != expected:
        raise InputError(
            f"{path} changed after the cache step wrote it (sha256 {actual[:16]}..., recorded "
            f"{expected[:16]}...); refusing to train on it. {_recache_hint(run)}"
        )
    return path


def read_manifest(cfg: Config, run: Run, split: str) -> pa.Table:
    import pyarrow.parquet as pq

    path = verify_active_manifest(cfg, run, split)
    table = pq.read_table(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise DataProblem(f"{path}: columns {missing} are missing (cache contract)")
    return table


@dataclass(frozen=True)
class Split:
    """One split as numpy arrays (row order of the manifest, sorted by snapshot_id)."""

    name: str
    snapshot_id: np.ndarray
    label: np.ndarray  # float64 0..5
    is_good: np.ndarray  # bool
    rating_count: np.ndarray  # int
    hist: np.ndarray  # (n, 6) float
    manual: np.ndarray  # bool: label_source == 'manual_review'
    image_paths: list[Path]

    def __len__(self) -> int:
        return len(self.label)


def load_split(cfg: Config, run: Run, split: str) -> Split:
    table = read_manifest(cfg, run, split)
    n = table.num_rows
    label = np.asarray(table.column("label_value").to_numpy(zero_copy_only=False), dtype=np.float64)
    if n and (not np.all(np.isfinite(label)) or label.min() < 0 or label.max() > 5):
        raise DataProblem(f"{split}: label_value must be finite and within 0..5")
    hists = table.column("rating_hist").to_pylist()
    hist = np.zeros((n, 6), dtype=np.float64)
    for i, h in enumerate(hists):
        if h is None:
            continue
        if len(h) != 6:
            raise DataProblem(
                f"{split}: rating_hist of snapshot row {i} has {len(h)} bins, expected 6"
            )
        hist[i] = h
    if np.any(hist < 0):
        raise DataProblem(f"{split}: rating_hist has negative counts")
    root = cfg.artifacts_dir
    paths = table.column("train_image_path").to_pylist()
    if any(p is None for p in paths):
        raise DataProblem(f"{split}: train_image_path has NULLs")
    counts = table.column("rating_count").to_pylist()
    return Split(
        name=split,
        snapshot_id=np.asarray(table.column("snapshot_id").to_pylist(), dtype=np.int64),
        label=label,
        is_good=np.asarray(table.column("is_good").to_pylist(), dtype=bool),
        rating_count=np.asarray([c or 0 for c in counts], dtype=np.int64),
        hist=hist,
        manual=np.asarray(
            [s == "manual_review" for s in table.column("label_source").to_pylist()], dtype=bool
        ),
        image_paths=[root / p for p in paths],
    )


def check_trainable(train: Split, val: Split, target: str) -> None:
    """Clean failure (run marked failed, exit 2) for data that cannot train a model."""
    if len(train) == 0:
        raise DataProblem("the training split is empty: nothing to train on")
    if len(train) < 2:
        raise DataProblem("the training split has 1 row; at least 2 are needed")
    if len(val) == 0:
        raise DataProblem("the validation split is empty: no way to pick the best checkpoint")
    if target == "binary":
        if train.is_good.all() or not train.is_good.any():
            raise DataProblem(
                f"training labels are single-valued: every is_good is {bool(train.is_good[0])}"
            )
    elif np.ptp(train.label) == 0:
        raise DataProblem(
            f"training labels are single-valued: every label_value is {train.label[0]:g}"
        )


# ---- targets ---------------------------------------------------------------------------


def smoothing_kernel(sigma: float) -> np.ndarray:
    """K[r, k]: how a single rating r spreads over the bins k = 0..5 (rows sum to 1)."""
    k = np.arange(6, dtype=np.float64)
    if sigma == 0:
        return np.eye(6)
    kern = np.exp(-((k[None, :] - k[:, None]) ** 2) / (2 * sigma**2))
    return kern / kern.sum(axis=1, keepdims=True)


def label_to_bins(value: float) -> np.ndarray:
    """A 0..5 value split linearly between its two neighbouring bins (mean preserved)."""
    d = np.zeros(6, dtype=np.float64)
    lo = int(np.floor(min(max(value, 0.0), 5.0)))
    frac = value - lo
    if lo >= 5:
        d[5] = 1.0
    else:
        d[lo] = 1.0 - frac
        d[lo + 1] = frac
    return d


def distribution_targets(split: Split, sigma: float) -> np.ndarray:
    """(n, 6) smoothed rating distributions (see module doc)."""
    kern = smoothing_kernel(sigma)
    out = np.zeros((len(split), 6), dtype=np.float64)
    for i in range(len(split)):
        counts = split.hist[i]
        if split.manual[i] or counts.sum() <= 0:
            out[i] = label_to_bins(float(split.label[i])) @ kern
        else:
            out[i] = (counts @ kern) / counts.sum()
    return out


def targets_for(split: Split, target: str, sigma: float) -> np.ndarray:
    if target == "regression":
        return split.label.astype(np.float32)[:, None]
    if target == "binary":
        return split.is_good.astype(np.float32)[:, None]
    if target == "distribution":
        return distribution_targets(split, sigma).astype(np.float32)
    raise ValueError(target)


def sample_weights(train: Split, split: Split, how: str) -> np.ndarray:
    """Per-row weights for ``split``, normalised by the training split's mean weight."""
    if how == "none":
        return np.ones(len(split), dtype=np.float32)
    ref = np.sqrt(np.maximum(train.rating_count, 1)).mean()
    return (np.sqrt(np.maximum(split.rating_count, 1)) / ref).astype(np.float32)


# ---- images ----------------------------------------------------------------------------


def open_rgb(path: Path, *, draft_size: int | None = None) -> Image.Image:
    """Open a cached training copy (JPEG, RGB by the cache contract) fully decoded."""
    img = Image.open(path, formats=["JPEG", "PNG", "WEBP"])
    if draft_size is not None and img.format == "JPEG":
        # DCT-domain downscale on decode: only by powers of two, never below draft_size.
        img.draft("RGB", (draft_size, draft_size))
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_rgb_array(path: Path) -> np.ndarray:
    """A cached training copy as a writable uint8 HWC array. JPEGs (what the cache writes) are
    decoded by simplejpeg: libjpeg-turbo straight into numpy, the same pixels as Pillow's
    decoder at about a third of the time per 256-px copy; anything else goes through Pillow."""
    data = path.read_bytes()
    if data[:3] == b"\xff\xd8\xff":
        import simplejpeg

        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    return np.array(open_rgb(path))


def brightness_contrast(x: torch.Tensor, b: float, c: float) -> torch.Tensor:
    """Brightness ``b``, then contrast ``c`` about the mean luminance, on a uint8 HWC image, as
    PIL's ``ImageEnhance.Brightness`` then ``ImageEnhance.Contrast`` do (to within rounding),
    fused into one affine map y = c*b*x + (1 - c)*b*mean(luma(x)); the +0.5 and the
    truncation to uint8 round to nearest."""
    if b == 1 and c == 1:
        return x
    xf = x.float()
    mean = float((xf.mean(dim=(0, 1)) * _LUMA).sum())
    xf.mul_(b * c).add_((1 - c) * b * mean + 0.5).clamp_(0, 255.49)
    return xf.to(torch.uint8)


class ManifestDataset(torch.utils.data.Dataset):
    """(uint8 HWC image, target, weight) per manifest row; augmentation when ``augment``."""

    def __init__(
        self,
        paths: list[Path],
        targets: np.ndarray,
        weights: np.ndarray,
        size: int,
        *,
        augment: bool = False,
        aug: dict[str, float] | None = None,
    ):
        self.paths = list(paths)
        self.targets = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32))
        self.weights = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))
        self.size = size
        self.augment = augment
        self.epoch_seed: int | None = None  # None: the caller's RNG stream
        self.aug = {
            "min_scale": 0.85,
            "ratio_jitter": 0.05,
            "brightness": 0.1,
            "contrast": 0.1,
            **(aug or {}),
        }

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch_seed(self, seed: int) -> None:
        """Row i's augmentation this epoch: drawn from seed (``seed``, i) alone."""
        self.epoch_seed = seed

    def row_seed(self, i: int) -> int:
        return (self.epoch_seed * 1_000_003 + i) % 2**63

    def _augmented(self, path: Path) -> torch.Tensor:
        """Decode + random-resized crop + flip + brightness/contrast, all on uint8 HWC memory.

        The decode worker shares the CPU with the training step (bench_train.py), so every
        step here is the cheapest exact one measured: simplejpeg decodes; the crop is copied
        to a dense channels_last tensor so that torch's antialiased uint8 bilinear kernel (the
        one torchvision's resize calls) runs its channels_last path and returns HWC memory
        (a third of the time of the same resize through torchvision on CHW, identical pixels);
        the flip and the brightness/contrast map then need no transposing copy. The crop is
        squashed to size x size like ``images.preprocess``.
        """
        from torchvision.transforms import RandomResizedCrop

        img = torch.from_numpy(decode_rgb_array(path)).permute(2, 0, 1)  # uint8 CHW view
        h, w = img.shape[-2:]
        frame_ratio = w / h
        j = self.aug["ratio_jitter"]
        top, left, ch, cw = RandomResizedCrop.get_params(
            img,
            scale=[self.aug["min_scale"], 1.0],
            ratio=[frame_ratio * (1 - j), frame_ratio * (1 + j)],
        )
        crop = img[:, top : top + ch, left : left + cw].unsqueeze(0)
        crop = crop.contiguous(memory_format=torch.channels_last)
        x = torch.nn.functional.interpolate(
            crop, size=(self.size, self.size), mode="bilinear", antialias=True
        )[0].permute(1, 2, 0)  # HWC, contiguous
        r = torch.rand(3).tolist()
        if r[0] < 0.5:
            x = x.flip(1)
        b = 1 + self.aug["brightness"] * (2 * r[1] - 1)
        c = 1 + self.aug["contrast"] * (2 * r[2] - 1)
        return brightness_contrast(x.contiguous(), b, c)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        path = self.paths[i]
        try:
            if self.augment and self.epoch_seed is not None:
                # the CPU generator alone, saved and restored around the row (6 us; not
                # torch.manual_seed, 145 us with its checks of every accelerator, nor
                # fork_rng around it: the decode worker's budget is ~1 ms an image)
                gen = torch.default_generator
                state = gen.get_state()
                gen.manual_seed(self.row_seed(i))
                try:
                    x = self._augmented(path)
                finally:
                    gen.set_state(state)
                return x, self.targets[i], self.weights[i]
            if self.augment:
                return self._augmented(path), self.targets[i], self.weights[i]
            arr = images.preprocess(open_rgb(path), self.size)
        except (OSError, ValueError, RuntimeError, Image.DecompressionBombError) as exc:
            # an InputError, not a DataProblem: the run is not failed, re-caching fixes it
            raise InputError(
                f"cached image {path} cannot be read ({exc}); re-run 'airatings cache'"
            ) from None
        return (
            torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)),
            self.targets[i],
            self.weights[i],
        )
