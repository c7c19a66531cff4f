"""Where every artifact lands: one typed tree built from the config. Jobs, tests and benchmarks
ask it for paths; no other module joins a run folder or spells a file name.

```
<artifacts_dir>/                         (paths.artifacts_dir, AIR_ARTIFACTS_DIR)
  datasets/<dataset hash>/               export: immutable, content-addressed
    dataset.json                         params, counts, every file's rows + sha256
    manifest_{full,train,val,test}.parquet / .csv
  images/                                cache: content-addressed, shared by all runs
    original/<aa>/<sha256>.<ext>         the downloaded bytes, validated
    train<short side>/<aa>/<sha256>.jpg  the training copy (short side resized)
  runs/<model_version>/                  one training run (a version is never reused)
    cache_shards/<i>-of-<n>.parquet      per-shard cache results (Indexed Jobs)
    failures.parquet                     rows the cache could not use, with the reason
    active/manifest_{train,val,test}.parquet   what training and evaluation read
    last.pt  best.pt  history.csv        training (checkpoints are plain dicts)
    metrics.json  report.html            evaluation
    model.onnx  parity.json              export-onnx
  models/<model_version>/                registered, write-once
    model.onnx  model_card.json  release.env  configmap.yaml
<data_dir>/                              (paths.data_dir, AIR_DATA_DIR): machine-local state
  pg/                                    the embedded PostgreSQL (no DATABASE_URL)
  dbt/target  dbt/logs                   dbt's compiled project, docs and logs
  duckdb/extensions                      postgres_scanner, installed from its PyPI package
  demo-images/  demo-truth.parquet       the demo world's images and hidden truth
```

Paths inside the images tree are also stored relative to ``artifacts_dir`` in the active
manifests (``image_path``, ``train_image_path``), so an artifact store can move.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jobs.config import Config

SPLITS = ("train", "val", "test")
MANIFEST_PARTS = ("full", *SPLITS)


@dataclass(frozen=True)
class DatasetPaths:
    root: Path

    @property
    def record(self) -> Path:
        return self.root / "dataset.json"

    def manifest(self, part: str, fmt: str = "parquet") -> Path:
        if part not in MANIFEST_PARTS or fmt not in ("parquet", "csv"):
            raise ValueError(f"no manifest {part!r} in format {fmt!r}")
        return self.root / f"manifest_{part}.{fmt}"


@dataclass(frozen=True)
class ImagePaths:
    artifacts_dir: Path

    @property
    def root(self) -> Path:
        return self.artifacts_dir / "images"

    @property
    def originals(self) -> Path:
        """Where downloads land (temp bodies, then content-addressed files)."""
        return self.root / "original"

    @staticmethod
    def original_rel(sha: str, ext: str) -> str:
        """The original's path relative to ``artifacts_dir`` (as stored in manifests)."""
        return f"images/original/{sha[:2]}/{sha}.{ext}"

    @staticmethod
    def train_rel(sha: str, short_side: int) -> str:
        """The training copy's path relative to ``artifacts_dir``."""
        return f"images/train{short_side}/{sha[:2]}/{sha}.jpg"

    def original(self, sha: str, ext: str) -> Path:
        return self.artifacts_dir / self.original_rel(sha, ext)

    def train_copy(self, sha: str, short_side: int) -> Path:
        return self.artifacts_dir / self.train_rel(sha, short_side)


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def shard_dir(self) -> Path:
        return self.root / "cache_shards"

    def shard(self, i: int, n: int) -> Path:
        return self.shard_dir / f"{i}-of-{n}.parquet"

    @property
    def failures(self) -> Path:
        return self.root / "failures.parquet"

    @property
    def active_dir(self) -> Path:
        return self.root / "active"

    def active_manifest(self, split: str) -> Path:
        if split not in SPLITS:
            raise ValueError(f"no active manifest for split {split!r}")
        return self.active_dir / f"manifest_{split}.parquet"

    @property
    def active_manifests(self) -> dict[str, Path]:
        return {s: self.active_manifest(s) for s in SPLITS}

    @property
    def last_checkpoint(self) -> Path:
        return self.root / "last.pt"

    @property
    def best_checkpoint(self) -> Path:
        return self.root / "best.pt"

    @property
    def history(self) -> Path:
        return self.root / "history.csv"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.parquet"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def onnx(self) -> Path:
        """export-onnx's output (register copies it, write-once, to models/<version>/)."""
        return self.root / "model.onnx"

    @property
    def parity(self) -> Path:
        """export-onnx's parity results (PyTorch vs onnxruntime, gate decisions)."""
        return self.root / "parity.json"


@dataclass(frozen=True)
class ReviewPaths:
    """``review/<cycle>/<version>/``: what one review cycle froze and produced."""

    root: Path

    @property
    def disagreements(self) -> Path:
        return self.root / "disagreements.parquet"

    @property
    def slices(self) -> Path:
        return self.root / "slices.parquet"

    @property
    def page(self) -> Path:
        return self.root / "review.html"


@dataclass(frozen=True)
class ModelPaths:
    root: Path

    @property
    def onnx(self) -> Path:
        return self.root / "model.onnx"

    @property
    def card(self) -> Path:
        return self.root / "model_card.json"

    @property
    def release_env(self) -> Path:
        return self.root / "release.env"

    @property
    def configmap(self) -> Path:
        return self.root / "configmap.yaml"


@dataclass(frozen=True)
class Paths:
    """The artifact tree and the machine-local data dir of one config."""

    artifacts_dir: Path
    data_dir: Path

    @classmethod
    def of(cls, cfg: Config) -> Paths:
        return cls(cfg.artifacts_dir, cfg.data_dir)

    # ---- artifacts
    def dataset(self, dataset_hash: str) -> DatasetPaths:
        return DatasetPaths(self.artifacts_dir / "datasets" / dataset_hash)

    @property
    def images(self) -> ImagePaths:
        return ImagePaths(self.artifacts_dir)

    @property
    def runs_dir(self) -> Path:
        return self.artifacts_dir / "runs"

    def run(self, model_version: str) -> RunPaths:
        return RunPaths(self.runs_dir / model_version)

    @property
    def models_dir(self) -> Path:
        return self.artifacts_dir / "models"

    def model(self, model_version: str) -> ModelPaths:
        return ModelPaths(self.models_dir / model_version)

    @property
    def review_dir(self) -> Path:
        return self.artifacts_dir / "review"

    def review(self, cycle: str, model_version: str) -> ReviewPaths:
        return ReviewPaths(self.review_dir / cycle / model_version)

    @property
    def review_history_png(self) -> Path:
        return self.review_dir / "history.png"

    # ---- machine-local state
    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pg"

    @property
    def dbt_target(self) -> Path:
        return self.data_dir / "dbt" / "target"

    @property
    def dbt_logs(self) -> Path:
        return self.data_dir / "dbt" / "logs"

    @property
    def duckdb_extensions(self) -> Path:
        return self.data_dir / "duckdb" / "extensions"

    @property
    def demo_images(self) -> Path:
        return self.data_dir / "demo-images"

    @property
    def demo_truth(self) -> Path:
        return self.data_dir / "demo-truth.parquet"


def of(cfg: Config) -> Paths:
    """The tree for ``cfg`` (``paths.of(cfg).run(version).best_checkpoint``)."""
    return Paths.of(cfg)
