"""The one typed run config: YAML (safe_load) + environment overrides -> a frozen model.

One file drives dbt vars and every job. Unknown keys, wrong types and unsafe YAML tags are
``ConfigError`` (exit 2) naming the key, raised before any job writes anything.

Environment overrides (applied after the file, before validation):

- ``DATABASE_URL``       -> ``database.url``
- ``AIR_ARTIFACTS_DIR``  -> ``paths.artifacts_dir``
- ``AIR_DATA_DIR``       -> ``paths.data_dir``
- ``AIR__<SECTION>__<KEY>=<yaml value>`` -> any other key, e.g. ``AIR__TRAIN__EPOCHS=3``.

``AIR_CONFIG`` names the config file when no path is given (``--config`` wins over it), so a
container needs no arguments; without either, ``configs/v2_baseline.yaml``.

A config file may start with ``extends: <other.yaml>`` (path relative to the file): the other
file is loaded first and this one is deep-merged over it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from jobs.errors import ConfigError

DEFAULT_CONFIG = Path("configs/v2_baseline.yaml")

# Names that reach SQL (schemas) must be plain identifiers even though we always quote them
# with psycopg.sql.Identifier: a value with quotes or ';' is a config mistake or an attack.
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
Identifier = Annotated[str, Field(pattern=_IDENT.pattern)]


class _Section(BaseModel):
    # allow_inf_nan=False: ``.inf``/``.nan`` (YAML or an AIR__ override) is refused naming the
    # key; a bound like ``ge=0`` alone lets ``.inf`` through (an infinite timeout, backoff...).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ProjectConfig(_Section):
    name: Identifier = "sunset"
    # Model versions are <version_prefix>_<yyyy_mm_dd>[_<n>], assigned at run start, never reused.
    version_prefix: Identifier = "sunset_v2"


class PathsConfig(_Section):
    """Machine-local locations. Not part of the config hash."""

    data_dir: Path = Path(".data")
    artifacts_dir: Path = Path("artifacts")


class DatabaseConfig(_Section):
    """Where the app's Postgres is. Not part of the config hash (it holds credentials)."""

    # None: start/use the embedded PostgreSQL under <data_dir>/pg.
    url: str | None = None
    app_schema: Identifier = "public"  # the app's tables
    ml_schema: Identifier = "airatings"  # tables this project owns (jobs/migrations)
    dbt_schema: Identifier = "ml"  # views/tables dbt builds
    connect_timeout_s: int = Field(10, ge=1, le=300)
    # Every connection (jobs, dbt, DuckDB) gets these; 0 turns one off. A statement running
    # longer than statement_timeout_s is cancelled (exit 75): a training-size export must fit.
    statement_timeout_s: float = Field(900.0, ge=0, le=86_400)
    # Waiting longer than this for a table or row lock cancels the statement (exit 75).
    lock_timeout_s: float = Field(30.0, ge=0, le=86_400)
    # TCP keepalives (client and server side): a dead peer is noticed after about
    # idle + interval * count seconds instead of never. keepalives_idle_s 0: off.
    keepalives_idle_s: int = Field(30, ge=0, le=7200)
    keepalives_interval_s: int = Field(10, ge=1, le=600)
    keepalives_count: int = Field(3, ge=1, le=100)


class SplitRatios(_Section):
    train: float = Field(0.8, gt=0, lt=1)
    val: float = Field(0.1, gt=0, lt=1)
    test: float = Field(0.1, gt=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitRatios:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"split ratios must sum to 1.0, got {total:g}")
        return self


class DatasetConfig(_Section):
    min_rating_count: int = Field(2, ge=1, le=1000)
    good_threshold: float = Field(4.0, ge=0, le=5)
    split_seed: int = Field(20261124, ge=0)
    split_ratios: SplitRatios = SplitRatios()
    # webcam_day: near-identical frames (same webcam, same UTC day) never straddle splits.
    group_key: Literal["webcam_day", "snapshot", "webcam"] = "webcam_day"
    allowed_url_schemes: tuple[Literal["https", "http", "file"], ...] = ("https", "http")
    # manifest_*.csv beside the Parquet files (same rows and columns; hashed with them)
    write_csv: bool = True


class CacheConfig(_Section):
    allow_file_urls: bool = False
    allow_private_networks: bool = False
    concurrency: int = Field(64, ge=1, le=1024)
    per_host: int = Field(16, ge=1, le=1024)
    connect_timeout_s: float = Field(10.0, gt=0)
    total_timeout_s: float = Field(60.0, gt=0)
    max_attempts: int = Field(4, ge=1, le=20)
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    retry_after_cap_s: float = Field(120.0, ge=0)
    max_redirects: int = Field(3, ge=0, le=10)
    max_bytes: int = Field(25_000_000, ge=1024)
    max_pixels: int = Field(40_000_000, ge=1024)
    formats: tuple[Literal["JPEG", "PNG", "WEBP", "GIF"], ...] = ("JPEG", "PNG", "WEBP", "GIF")
    train_short_side: int = Field(256, ge=32, le=4096)
    jpeg_quality: int = Field(92, ge=50, le=100)
    failure_rate_limit: float = Field(0.2, ge=0, le=1)
    # Exact "<ip>:<port>" targets allowed although not public (a local mirror, a test server);
    # everything else private stays refused. allow_private_networks opens all of them.
    allowed_private_hosts: tuple[
        Annotated[str, Field(pattern=r"^(\[[0-9a-fA-F:.]+\]|[0-9.]+):\d{1,5}$")], ...
    ] = ()
    # file:// URLs (allow_file_urls) are read only below this directory; None: paths.data_dir.
    file_root: Path | None = None
    # CPU threads for decode/validate/resize (None: the CPUs this process may use, a
    # container's CPU quota included: jobs.resources.available_cpus).
    cpu_workers: int | None = Field(None, ge=1, le=256)
    progress_every_s: float = Field(10.0, gt=0)


class TrainConfig(_Section):
    backbone: Literal["mobilenet_v3_small", "resnet18", "efficientnet_b0"] = "mobilenet_v3_small"
    target: Literal["regression", "binary", "distribution"] = "regression"
    weights: Literal["imagenet", "none"] = "imagenet"
    weights_path: Path | None = None
    allow_random_init: bool = False
    input_size: int = Field(224, ge=32, le=1024)
    epochs: int = Field(12, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=4096)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: int = Field(1, ge=0)
    freeze_backbone_epochs: int = Field(1, ge=0)
    early_stopping_patience: int = Field(4, ge=1)
    grad_clip_norm: float = Field(1.0, gt=0)
    sample_weighting: Literal["none", "sqrt_count"] = "none"
    seed: int = Field(1234, ge=0)
    num_workers: int = Field(2, ge=0, le=64)
    # torch threads; None: the CPUs this process may use, a container's CPU quota included
    # (jobs.resources.available_cpus).
    threads: int | None = Field(None, ge=1, le=256)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # distribution target: each person's rating becomes a discrete Gaussian (this sigma, in
    # rating steps) over the bins 0..5 before averaging; 0 = the raw histogram.
    hist_smoothing_sigma: float = Field(0.5, ge=0, le=5)
    # Augmentation (train split only): random-resized crop keeping >= this share of the frame
    # (aspect ratio within +-aug_ratio_jitter of the frame's), h-flip, brightness/contrast.
    # No hue/saturation jitter: colour is what people rate.
    aug_min_scale: float = Field(0.85, gt=0, le=1)
    aug_ratio_jitter: float = Field(0.05, ge=0, lt=1)
    aug_brightness: float = Field(0.1, ge=0, lt=1)
    aug_contrast: float = Field(0.1, ge=0, lt=1)


class EvaluateConfig(_Section):
    min_test_rows: int = Field(30, ge=1)
    min_slice_size: int = Field(20, ge=1)
    bootstrap_samples: int = Field(1000, ge=10, le=100_000)
    ci_level: float = Field(0.95, gt=0.5, lt=1)
    seed: int = Field(7, ge=0)
    # Another run's model version to compare with on the same test rows (paired bootstrap).
    compare_to: str | None = None
    batch_size: int = Field(64, ge=1, le=4096)


class ScoreConfig(_Section):
    """`airatings score` (jobs/score.py). Not part of the config hash: how a model is applied
    does not change what a run is."""

    # onnxruntime intra-op threads; 0: the CPUs this process may use (cgroup-aware).
    threads: int = Field(0, ge=0, le=256)
    # Image decoding threads beside onnxruntime (Pillow releases the GIL); 0: as threads.
    decode_threads: int = Field(0, ge=0, le=256)
    # Snapshots per database transaction (one batch: its rows and webcam fields commit together).
    batch_size: int = Field(64, ge=1, le=10_000)
    # Images per onnxruntime call (same height x width: webcams send one size each).
    max_batch: int = Field(32, ge=1, le=1024)
    # The default window of `airatings score` without --since/--backfill.
    since_hours: float = Field(24.0, gt=0, le=24 * 3650)


class ReviewConfig(_Section):
    """`airatings review` (jobs/review.py). Not part of the config hash."""

    top_n: int = Field(20, ge=0, le=10_000)  # the largest |aiRating - label|
    boundary_low: float = Field(3.7, ge=0, le=5)  # the band around the capture threshold
    boundary_high: float = Field(4.3, ge=0, le=5)
    boundary_n: int = Field(10, ge=0, le=10_000)  # a seeded random sample from the band
    holdout_n: int = Field(5, ge=0, le=10_000)  # random never-reviewed snapshots
    seed: int = Field(11, ge=0)

    @model_validator(mode="after")
    def _band(self) -> ReviewConfig:
        if self.boundary_low > self.boundary_high:
            raise ValueError("boundary_low must not exceed boundary_high")
        return self


class DemoConfig(_Section):
    snapshots: int = Field(3000, ge=10, le=10_000_000)
    seed: int = Field(42, ge=0)
    image_width: int = Field(640, ge=32, le=4096)
    image_height: int = Field(360, ge=18, le=4096)
    webcams: int = Field(24, ge=4, le=100_000)
    raters: int = Field(120, ge=2, le=1_000_000)
    days: int = Field(42, ge=1, le=3650)
    dead_url_rate: float = Field(0.03, ge=0, le=1)
    # Corrupt files: half truncated JPEGs, half HTML error pages saved as .jpg.
    corrupt_rate: float = Field(0.01, ge=0, le=1)
    null_url_rate: float = Field(0.01, ge=0, le=1)
    empty_url_rate: float = Field(0.005, ge=0, le=1)
    # Webcams (the last ones) whose image files are all missing.
    missing_image_webcams: int = Field(1, ge=0, le=100_000)
    # Exact copies of existing rating rows under a new id (dbt must dedupe them).
    duplicate_ratings: int = Field(1, ge=0, le=1000)
    rater_bias_sd: float = Field(0.4, ge=0, le=5)
    rater_noise_min: float = Field(0.6, ge=0, le=5)
    rater_noise_max: float = Field(0.8, ge=0, le=5)
    jpeg_quality: int = Field(88, ge=50, le=100)
    # Rendering processes (numpy + PIL per image); 1 renders in the calling process.
    workers: int = Field(2, ge=1, le=256)

    @model_validator(mode="after")
    def _check_world(self) -> DemoConfig:
        if self.rater_noise_min > self.rater_noise_max:
            raise ValueError("rater_noise_min must not exceed rater_noise_max")
        if self.missing_image_webcams >= self.webcams:
            raise ValueError("missing_image_webcams must leave at least one webcam with images")
        rates = self.dead_url_rate + self.corrupt_rate + self.null_url_rate + self.empty_url_rate
        if rates > 0.5:
            raise ValueError(f"fault rates add up to {rates:g}; at most 0.5 keeps the world usable")
        return self


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    project: ProjectConfig = ProjectConfig()
    paths: PathsConfig = PathsConfig()
    database: DatabaseConfig = DatabaseConfig()
    dataset: DatasetConfig = DatasetConfig()
    cache: CacheConfig = CacheConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    score: ScoreConfig = ScoreConfig()
    review: ReviewConfig = ReviewConfig()
    demo: DemoConfig = DemoConfig()

    # Where the config came from (not hashed, not validated from YAML).
    source: str = Field("<defaults>", exclude=True)

    # ---- derived values -------------------------------------------------------------
    @property
    def hashed_view(self) -> dict[str, Any]:
        """What defines a run: everything but machine-local paths, the database location and
        how a registered model is applied and reviewed (``score``, ``review``)."""
        return self.model_dump(
            mode="json", exclude={"paths", "database", "score", "review", "source"}
        )

    @property
    def config_hash(self) -> str:
        blob = json.dumps(self.hashed_view, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def train_hash(self) -> str:
        """What defines a training's result: ``dataset`` and ``train`` without the settings
        that only change how fast it runs (workers, threads, device). A checkpoint resumes only
        under the same train hash, so changing ``evaluate:`` or ``cache:`` keys, or the worker
        count on a restarted pod, does not block a resume."""
        view = self.model_dump(mode="json", include={"dataset", "train"})
        for key in ("num_workers", "threads", "device"):
            view["train"].pop(key)
        blob = json.dumps(view, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def data_dir(self) -> Path:
        return self.paths.data_dir.resolve()

    @property
    def artifacts_dir(self) -> Path:
        return self.paths.artifacts_dir.resolve()

    def dbt_vars(self) -> dict[str, Any]:
        """The values the SQL needs, passed to every dbt invocation as --vars."""
        d = self.dataset
        return {
            "app_schema": self.database.app_schema,
            "ml_schema": self.database.ml_schema,
            "min_rating_count": d.min_rating_count,
            "good_threshold": d.good_threshold,
            "split_seed": d.split_seed,
            "split_train": d.split_ratios.train,
            "split_val": d.split_ratios.val,
            "split_test": d.split_ratios.test,
            "group_key": d.group_key,
            "allowed_url_schemes": list(d.allowed_url_schemes),
            # the review report's slices, like the evaluation's
            "review_min_slice_size": self.evaluate.min_slice_size,
        }

    def to_yaml(self) -> str:
        """The resolved config (database URL redacted), as written next to run artifacts."""
        data = self.model_dump(mode="json", exclude={"source"})
        if data["database"].get("url"):
            data["database"]["url"] = "<redacted>"
        return yaml.safe_dump(data, sort_keys=False)


# ---- loading ---------------------------------------------------------------------------


class _SafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no ``!!python/...`` tags) that also reads ``1e-3`` as a float.

    PyYAML follows YAML 1.1, where a float needs a dot (``1.0e-3``); ``1e-3`` would stay a
    string, which the strict validation below then refuses. YAML 1.2 and every user read it as
    a number."""


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    try:
        data = _yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        # safe_load refuses !!python/... tags with a ConstructorError naming the tag.
        raise ConfigError(f"{path}: not valid safe YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: extends: must be a file path")
        base = _read_yaml((path.parent / parent), (*seen, path.resolve()))
        data = _deep_merge(base, data)
    return data


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


_ENV_SHORTCUTS = {
    "DATABASE_URL": ("database", "url"),
    "AIR_ARTIFACTS_DIR": ("paths", "artifacts_dir"),
    "AIR_DATA_DIR": ("paths", "data_dir"),
}


# Why this is not pydantic-settings' EnvSettingsSource (tried with pydantic-settings 2.16:
# a subclass over ``Config`` with env_prefix="AIR__", env_nested_delimiter="__",
# case_sensitive=False, fed the ``env`` mapping through ``_load_env_vars``, every field
# "complex" (``field_is_complex``) so that ``decode_complex_value`` parses each leaf as YAML,
# and env_parse_none_str="" so that an empty value stays null as here). It builds the nested
# dict, but everything else these overrides promise still has to be written by hand, and it
# needs the name split anyway:
# - an unknown section (``AIR__NOPE__X``) is silently ignored: the source only looks up the
#   model's fields (pydantic-settings issue #985, open), so every AIR__ name must be checked here;
# - ``AIR__TRAIN=3`` is taken as the whole ``train`` section (strict validation then says
#   "train: Input should be an object"), not refused as a malformed name;
# - ``AIR__TRAIN__A__B`` is exploded into ``{"train": {"a": {"b": ...}}}``; deeper names into a
#   nested model merge in the order of the environment (``AIR__DATASET__SPLIT_RATIOS__VAL``
#   before ``AIR__DATASET__SPLIT_RATIOS`` is silently lost);
# - a YAML error surfaces from ``decode_complex_value``, which is given the key, not the
#   variable, so naming the variable needs a parse here first.
# What remains for the library is ``data[section][key] = value``: about 15 lines of subclass
# (and a private hook) to replace one. The checks below are the whole job.
def _apply_env(data: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    data = dict(data)

    def put(section: str, key: str, value: Any, origin: str) -> None:
        if section not in Config.model_fields or section == "source":
            raise ConfigError(f"{origin}: unknown config section '{section}'")
        sec = data.get(section)
        sec = dict(sec) if isinstance(sec, dict) else {}
        sec[key] = value
        data[section] = sec

    for var, (section, key) in _ENV_SHORTCUTS.items():
        if env.get(var):
            put(section, key, env[var], var)
    for var, raw in env.items():
        if not var.startswith("AIR__"):
            continue
        parts = var[len("AIR__") :].lower().split("__")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"{var}: expected AIR__<SECTION>__<KEY>")
        try:
            value = _yaml(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{var}: not a valid YAML value: {exc}") from None
        put(parts[0], parts[1], value, var)
    return data


def _format_validation_error(source: str, exc: ValidationError) -> str:
    lines = [f"{source}: invalid config"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def _plain(value: Any, key: str) -> Any:
    """``value`` as plain JSON data (mappings with string keys, lists, scalars), or a
    ConfigError naming the key (YAML dates, sets, binary, non-string keys...)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(f"{key or '<root>'}: key {k!r} must be a string")
            out[k] = _plain(v, f"{key}.{k}" if key else k)
        return out
    if isinstance(value, list | tuple):
        return [_plain(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, str | bool | int | float):
        return value
    raise ConfigError(f"{key}: a {type(value).__name__} is not a valid config value")


def load_config(path: str | Path | None = None, env: dict[str, str] | None = None) -> Config:
    """Load, merge, override and validate. Raises ConfigError (exit 2) on any problem.

    The file: ``path``, else ``AIR_CONFIG`` from ``env``, else ``configs/v2_baseline.yaml``.
    ``env`` defaults to ``os.environ``; a given mapping is the whole environment.

    Validation is strict (as for JSON input): a wrong type is an error, never coerced, so
    ``allow_file_urls: 1`` or ``epochs: true`` or ``epochs: "3"`` names the key instead of
    quietly becoming ``True`` or ``1`` or ``3``. Integers are accepted where a float is expected.
    """
    env = dict(os.environ) if env is None else env
    if path is None and env.get("AIR_CONFIG"):
        path = Path(env["AIR_CONFIG"])
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (from AIR_CONFIG)")
    path = Path(path) if path is not None else DEFAULT_CONFIG
    data = _plain(_apply_env(_read_yaml(path), env), "")
    try:
        return Config.model_validate_json(
            json.dumps({**data, "source": str(path)}, allow_nan=True), strict=True
        )
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(str(path), exc)) from None
