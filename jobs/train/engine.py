"""The training loop, top to bottom like torchvision's references/classification/train.py:
build data, build model, ``train_one_epoch``, ``evaluate`` (returns metrics), ``main``.

Device and AMP are decided once (CUDA with float16 autocast and a GradScaler when present,
``nullcontext`` on CPU). One seed drives Python, numpy and torch; each epoch reseeds from
(seed, epoch) and so does the DataLoader's generator, so a resumed run draws exactly what an
uninterrupted one would and, on CPU, ends with the same weights hash.

The data order and the augmentation are functions of (seed, epoch) and of (seed, epoch, row):
the sampler is ``DistributedSampler`` (one replica when training alone), and each row's
augmentation draws from its own seed. So under ``torchrun --nproc_per_node N``
(:mod:`jobs.distributed`) step k of an epoch covers exactly the rows, augmented exactly as, of
step k of a 1-process run with the same global batch: each rank takes every N-th row of the
same permutation, ``train.batch_size / N`` rows a step; DistributedDataParallel averages the
gradients, the loss is normalised by the global batch's weight, BatchNorm layers that train
use the global batch's statistics (SyncBatchNorm), and validation is sharded and gathered, so
every rank computes the same metrics from the same outputs. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import math
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from jobs import paths
from jobs.artifacts import atomic_path, atomic_write_text, sha256_file
from jobs.config import Config
from jobs.distributed import Dist
from jobs.errors import ConfigError, InputError
from jobs.logs import get_logger
from jobs.paths import RunPaths
from jobs.runs import Run
from jobs.train import data as train_data
from jobs.train import model as train_model

CHECKPOINT_FORMAT = "airatings-train-v1"
HISTORY_COLUMNS = (
    "epoch",
    "lr",
    "frozen",
    "train_loss",
    "train_images",
    "val_loss",
    "val_mae",
    "val_rmse",
    "val_spearman",
    "val_auc",
    "img_per_s",
    "seconds",
)

log = get_logger()


class NonFiniteLoss(train_data.DataProblem):
    """The loss became NaN/inf: the run is marked failed."""


# ---- reproducibility -------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int, nice: int = 0) -> None:
    """DataLoader worker init: numpy/random seeded from the worker's torch seed (which the
    DataLoader derived from its generator). ``nice`` > 0 lowers the worker's priority: on a
    CPU-only machine the compute threads then keep their cores and the decode work fills the
    gaps (bench_train.py: 0.76x -> 0.81x of the in-memory limit on 2 cores)."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)
    if nice:
        os.nice(nice)


def worker_init_for(device: torch.device) -> functools.partial:
    return functools.partial(seed_worker, nice=10 if device.type == "cpu" else 0)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def library_versions() -> dict[str, str]:
    import PIL
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "platform": platform.platform(),
    }


def decide_device(cfg: Config, dist: Dist | None = None) -> torch.device:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'"
        )
    if want in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda") if dist is None else torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def default_threads(cfg: Config, dist: Dist | None = None) -> int:
    """``train.threads``, else the CPUs this process may use (a container's quota included),
    shared by the ranks on this machine."""
    from jobs.resources import available_cpus

    if cfg.train.threads:
        return cfg.train.threads
    return max(1, available_cpus() // (dist.local_world_size if dist else 1))


def per_rank_batch_size(cfg: Config, dist: Dist | None) -> int:
    """``train.batch_size`` is the global batch; each of N ranks takes batch_size / N."""
    b = cfg.train.batch_size
    if dist is None:
        return b
    if b % dist.world_size:
        raise ConfigError(
            f"train.batch_size {b} (the global batch) is not divisible by the {dist.world_size} "
            f"ranks of this torchrun job; set it to a multiple of {dist.world_size} (e.g. "
            f"{max(dist.world_size, b - b % dist.world_size)}) or change --nproc-per-node/--nnodes"
        )
    return b // dist.world_size


# ---- losses ----------------------------------------------------------------------------


def emd_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample squared-CDF Earth Mover's Distance (NIMA, r = 2):
    sqrt(mean_k (CDF_target(k) - CDF_pred(k))^2) over the 6 bins; shape (N,)."""
    pred = torch.softmax(logits.float(), dim=1)
    diff = torch.cumsum(target.float(), dim=1) - torch.cumsum(pred, dim=1)
    return torch.sqrt(torch.mean(diff**2, dim=1) + 1e-12)


def per_sample_loss(outputs: torch.Tensor, targets: torch.Tensor, target: str) -> torch.Tensor:
    outputs = outputs.float()
    if target == "regression":
        return (outputs[:, 0] - targets[:, 0]) ** 2
    if target == "binary":
        return nn.functional.binary_cross_entropy_with_logits(
            outputs[:, 0], targets[:, 0], reduction="none"
        )
    if target == "distribution":
        return emd_loss(outputs, targets)
    raise ValueError(target)


def weighted_loss(
    outputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, target: str
) -> torch.Tensor:
    return (per_sample_loss(outputs, targets, target) * weights).sum() / weights.sum().clamp_min(
        1e-12
    )


# ---- data --------------------------------------------------------------------------------


def build_data(
    cfg: Config, run: Run, device: torch.device, dist: Dist | None = None
) -> dict[str, Any]:
    from torch.utils.data.distributed import DistributedSampler

    t = cfg.train
    train = train_data.load_split(cfg, run, "train")
    val = train_data.load_split(cfg, run, "val")
    train_data.check_trainable(train, val, t.target)
    aug = {
        "min_scale": t.aug_min_scale,
        "ratio_jitter": t.aug_ratio_jitter,
        "brightness": t.aug_brightness,
        "contrast": t.aug_contrast,
    }
    train_ds = train_data.ManifestDataset(
        train.image_paths,
        train_data.targets_for(train, t.target, t.hist_smoothing_sigma),
        train_data.sample_weights(train, train, t.sample_weighting),
        t.input_size,
        augment=True,
        aug=aug,
    )
    # The global order of an epoch: randperm(seed + epoch) (set_epoch each epoch). Alone, the
    # one replica takes all of it; rank r of N takes rows r, r + N, ... (padded to a multiple
    # of N by repeating the first rows), so step k of every rank together is step k alone.
    sampler = DistributedSampler(
        train_ds,
        num_replicas=dist.world_size if dist else 1,
        rank=dist.rank if dist else 0,
        shuffle=True,
        seed=epoch_seed(t.seed, 0),
    )
    val_ds = train_data.ManifestDataset(
        val.image_paths,
        train_data.targets_for(val, t.target, t.hist_smoothing_sigma),
        train_data.sample_weights(train, val, t.sample_weighting),
        t.input_size,
    )
    generator = torch.Generator()
    pin = device.type == "cuda"
    common = {
        "num_workers": t.num_workers,
        "pin_memory": pin,
        "worker_init_fn": worker_init_for(device),
    }
    batch = per_rank_batch_size(cfg, dist)
    train_loader = torch.utils.data.DataLoader(
        train_ds,
        batch_size=batch,
        sampler=sampler,
        generator=generator,
        # a last batch of 1 breaks BatchNorm in train mode (alone; with N ranks the global
        # batch of a last step has at least N rows)
        drop_last=dist is None and len(train_ds) > batch and len(train_ds) % batch == 1,
        **common,
    )
    # validation: rank r predicts rows r, r + N, ...; the outputs are gathered in row order
    val_rows = (
        val_ds
        if dist is None
        else torch.utils.data.Subset(val_ds, range(dist.rank, len(val_ds), dist.world_size))
    )
    val_loader = torch.utils.data.DataLoader(
        val_rows, batch_size=t.batch_size, shuffle=False, **common
    )
    return {
        "train": train,
        "val": val,
        "train_ds": train_ds,
        "sampler": sampler,
        "train_loader": train_loader,
        "val_loader": val_loader,
        "generator": generator,
    }


# ---- model -------------------------------------------------------------------------------


def build_model(
    cfg: Config, spec: dict[str, Any], train: train_data.Split, *, resuming: bool
) -> tuple[nn.Module, str]:
    """The network for the config's target; pretrained backbone per ``train.weights``."""
    t = cfg.train
    weights_file = None
    weights_used = "none"
    if t.weights == "imagenet" and not resuming:
        candidates = train_model.imagenet_weights_candidates(t.backbone, t.weights_path)
        found = [p for p in candidates if p.is_file()]
        if found:
            weights_file, weights_used = found[0], f"imagenet:{found[0]}"
        elif t.allow_random_init:
            weights_used = "random (imagenet weights not found)"
            log.warning(
                "pretrained_weights_missing",
                looked_in=[str(p) for p in candidates],
                fallback="random_init",
            )
        else:
            raise InputError(
                f"ImageNet weights for {t.backbone} not found at {', '.join(str(p) for p in candidates)} "
                f"(training downloads nothing: run 'airatings weights pull {t.backbone}' to fetch "
                f"torchvision's, hash-checked, or put the file there or set train.weights_path; "
                f"or set train.weights: none / train.allow_random_init: true to start from random "
                f"weights)"
            )
    elif resuming:
        weights_used = "resumed"
    model = train_model.build_model(spec, state_dict_file=weights_file)
    # torchvision's MobileNet/EfficientNet use BatchNorm momentum 0.01 (tuned for long ImageNet
    # runs); for a few epochs the running statistics would lag far behind the weights and the
    # validation metric would measure the lag. 0.1 (PyTorch's default) follows within an epoch.
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
    if not resuming:
        init_head_bias(model, train, cfg)
    return model, weights_used


def init_head_bias(model: nn.Module, train: train_data.Split, cfg: Config) -> None:
    """Start the head at the training prior (mean label / positive rate / mean distribution)."""
    head = model.head()
    with torch.no_grad():
        if cfg.train.target == "regression":
            head.bias.fill_(float(train.label.mean()))
        elif cfg.train.target == "binary":
            p = float(np.clip(train.is_good.mean(), 1e-3, 1 - 1e-3))
            head.bias.fill_(math.log(p / (1 - p)))
        else:
            mean = train_data.distribution_targets(train, cfg.train.hist_smoothing_sigma).mean(
                axis=0
            )
            head.bias.copy_(torch.from_numpy(np.log(np.clip(mean, 1e-4, None))).float())


def set_frozen(model: nn.Module, frozen: bool) -> None:
    for p in train_model.backbone_parameters(model):
        p.requires_grad_(not frozen)


def lr_lambda_factory(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def lr_lambda(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return lr_lambda


# ---- one epoch ---------------------------------------------------------------------------


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    autocast: Callable[[], Any],
    cfg: Config,
    epoch: int,
    frozen: bool,
    *,
    net: nn.Module | None = None,
    dist: Dist | None = None,
) -> dict[str, float]:
    """One pass over the training rows. ``net``: what runs the forward pass (the
    DistributedDataParallel wrapper of ``model`` under torchrun); ``dist``: this rank's place,
    the loss then normalised by the global batch's weight (see module doc)."""
    from tqdm import tqdm

    net = model if net is None else net
    net.train()
    if frozen:  # keep the pretrained BatchNorm statistics while only the head learns
        model.backbone.eval()
        model.head().train()
    total_loss, total_w, images, compute_s = 0.0, 0.0, 0, 0.0
    started = time.perf_counter()
    bar = tqdm(
        loader,
        desc=f"epoch {epoch}/{cfg.train.epochs}",
        unit="batch",
        leave=False,
        disable=not sys.stderr.isatty(),
    )
    for x, y, w in bar:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        w = w.to(device, non_blocking=True)
        with autocast():
            out = net(x)
        if dist is None:
            loss = weighted_loss(out, y, w, cfg.train.target)
            shown, bw, n = loss, float(w.sum()), x.shape[0]
        else:
            # sum_i l_i w_i / W over the global batch: DDP averages the ranks' gradients, so
            # each rank's part is scaled by N / W (W: the global batch's weight)
            part = (per_sample_loss(out, y, cfg.train.target) * w).sum()
            glob = torch.stack([part.detach(), w.sum().float(), part.new_tensor(x.shape[0])])
            torch.distributed.all_reduce(glob)
            total, weight, count = glob.tolist()
            loss = part * (dist.world_size / max(weight, 1e-12))
            shown, bw, n = torch.tensor(total / max(weight, 1e-12)), weight, int(count)
        if not torch.isfinite(shown):
            raise NonFiniteLoss(
                f"the training loss became {shown.item()} at epoch {epoch}; lower train.lr "
                f"({cfg.train.lr:g}) or check the labels"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], cfg.train.grad_clip_norm
        )
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total_loss += float(shown.detach()) * bw
        total_w += bw
        images += n
        bar.set_postfix(loss=f"{total_loss / max(total_w, 1e-12):.4f}")
    compute_s = time.perf_counter() - started
    return {
        "train_loss": total_loss / max(total_w, 1e-12),
        "train_images": images,
        "img_per_s": images / compute_s if compute_s > 0 else 0.0,
        "lr": optimizer.param_groups[0]["lr"],
    }


@torch.inference_mode()
def predict(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    autocast: Callable[[], Any],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    model.eval()
    outs, ys, ws = [], [], []
    for x, y, w in loader:
        with autocast():
            out = model(x.to(device, non_blocking=True))
        outs.append(out.float().cpu())
        ys.append(y)
        ws.append(w)
    return torch.cat(outs), torch.cat(ys), torch.cat(ws)


def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    autocast: Callable[[], Any],
    split: train_data.Split,
    target: str,
    dist: Dist | None = None,
) -> dict[str, float | None]:
    """Validation metrics on 0..5 scores vs ``label_value`` (and AUC vs ``is_good``). Under
    torchrun each rank predicts its shard (rows r, r + N, ...) and the outputs are gathered in
    row order, so every rank computes the metrics of the whole split."""
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    out, y, w = predict(model, loader, device, autocast)
    if dist is not None:
        out, y, w = gather_rows(dist, (out, y, w), len(split))
    loss = float(weighted_loss(out, y, w, target))
    score = train_model.scores_from_outputs(out, target).numpy().astype(np.float64)
    err = score - split.label
    both = split.is_good.any() and not split.is_good.all()
    varied = len(score) > 2 and np.ptp(score) > 0 and np.ptp(split.label) > 0
    return {
        "val_loss": loss,
        "val_mae": float(np.abs(err).mean()),
        "val_rmse": float(np.sqrt((err**2).mean())),
        "val_spearman": float(spearmanr(score, split.label).statistic) if varied else None,
        "val_auc": float(roc_auc_score(split.is_good, score)) if both else None,
    }


def gather_rows(dist: Dist, parts: tuple[torch.Tensor, ...], n: int) -> tuple[torch.Tensor, ...]:
    """Every rank's rows (rank r holds rows r, r + N, ...) back in row order, on every rank."""
    from jobs.distributed import peer_loss_is_transient

    shards: list[Any] = [None] * dist.world_size
    with peer_loss_is_transient():
        torch.distributed.all_gather_object(shards, parts)
    out = []
    for i, first in enumerate(parts):
        full = first.new_empty((n, *first.shape[1:]))
        for r, shard in enumerate(shards):
            full[r :: dist.world_size] = shard[i]
        out.append(full)
    return tuple(out)


# ---- checkpoints -------------------------------------------------------------------------


def _check_checkpoint(path: Path) -> None:
    ckpt = train_model.load_weights_only(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: checkpoint did not read back")


def save_checkpoint(ckpt: dict[str, Any], path: Path) -> None:
    with atomic_path(path, check=_check_checkpoint) as tmp:
        torch.save(ckpt, tmp)


def load_resume_checkpoint(
    path: Path, cfg: Config, run: Run, spec: dict[str, Any]
) -> dict[str, Any]:
    ckpt = train_model.load_weights_only(path, what="checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not an airatings training checkpoint; delete it to start over")
    if ckpt.get("dataset_hash") != run.dataset_hash:
        raise InputError(
            f"{path} was trained on dataset {ckpt.get('dataset_hash')}, but run {run.model_version} has "
            f"dataset {run.dataset_hash}; refusing to resume (delete it to start over)"
        )
    written = ckpt.get("train_hash", ckpt.get("config_hash"))
    if written != cfg.train_hash:
        raise InputError(
            f"{path} was written with train config hash {written}, this config is "
            f"{cfg.train_hash} (dataset/train settings differ); resume with the original "
            f"config or delete it to start over"
        )
    if ckpt.get("spec") != spec:
        raise InputError(
            f"{path}: model spec {ckpt.get('spec')} differs from {spec}; refusing to resume"
        )
    return ckpt


def training_data_hash(*splits: train_data.Split) -> str:
    """The rows training actually reads (the *active* manifests: ids, labels, histograms,
    counts and image content names). The run's dataset hash names the export; the active
    rows also depend on which downloads succeeded, and a re-cache can change them."""
    import hashlib

    h = hashlib.sha256()
    for s in splits:
        h.update(f"{s.name}:{len(s)}".encode())
        for a in (s.snapshot_id, s.label, s.is_good, s.rating_count, s.hist, s.manual):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update("\n".join(p.name for p in s.image_paths).encode())  # <sha256>.jpg
    return h.hexdigest()


def check_resume_data(ckpt: dict[str, Any], path: Path, data_hash: str) -> None:
    if ckpt.get("data_hash", data_hash) != data_hash:
        raise InputError(
            f"{path} was trained on other training rows (active manifests {ckpt['data_hash'][:12]}, "
            f"now {data_hash[:12]}: the run was re-cached); refusing to resume (delete it to start over)"
        )


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(
        buf, fieldnames=HISTORY_COLUMNS, extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in HISTORY_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def _improved(value: float | None, best: float | None, mode: str) -> bool:
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best if mode == "min" else value > best


# ---- main --------------------------------------------------------------------------------


def main(
    cfg: Config,
    run: Run,
    *,
    epoch_callback: Callable[[int, dict[str, Any]], None] | None = None,
    dist: Dist | None = None,
) -> dict[str, Any]:
    """Train ``run`` to its best checkpoint; resumes from ``last.pt``. Returns the summary.

    ``dist``: this process is one rank of a torchrun job whose process group is up (every rank
    calls this; only rank 0 writes files, and the ranks meet after each epoch's checkpoint
    is saved, before ``epoch_callback``)."""
    t = cfg.train
    main_rank = dist is None or dist.is_main
    started = time.monotonic()
    run_paths = paths.of(cfg).run(run.model_version)
    out_dir = run_paths.root
    if main_rank:
        out_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path, history_path = (
        run_paths.last_checkpoint,
        run_paths.best_checkpoint,
        run_paths.history,
    )

    device = decide_device(cfg, dist)
    torch.set_num_threads(default_threads(cfg, dist))
    use_amp = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if use_amp else nullcontext
    seed_everything(t.seed)

    spec = {"backbone": t.backbone, "target": t.target, "input_size": t.input_size}
    resume = load_resume_checkpoint(last_path, cfg, run, spec) if last_path.exists() else None
    if main_rank:
        atomic_write_text(out_dir / "config.yaml", cfg.to_yaml())

    data = build_data(cfg, run, device, dist)
    train, val = data["train"], data["val"]
    data_hash = training_data_hash(train, val)
    if resume is not None:
        check_resume_data(resume, last_path, data_hash)
    model, weights_used = build_model(cfg, spec, train, resuming=resume is not None)
    if resume is not None:
        model.load_state_dict(resume["model"])
        weights_used = resume["weights_used"]
    pretrained = weights_used.startswith("imagenet")
    model.to(device, memory_format=torch.channels_last)
    if dist is not None:
        from jobs.distributed import sync_batchnorm

        model = sync_batchnorm(model, device.type)

    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    steps_per_epoch = len(data["train_loader"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda_factory(t.epochs * steps_per_epoch, t.warmup_epochs * steps_per_epoch)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)

    if t.target == "binary":
        both = val.is_good.any() and not val.is_good.all()
        metric_name, mode = ("val_auc", "max") if both else ("val_loss", "min")
        if not both:
            log.warning(
                "val_auc_undefined", reason="validation split has one class", metric=metric_name
            )
    else:
        metric_name, mode = "val_mae", "min"

    start_epoch, best, best_epoch, bad_epochs, history, stopped = 1, None, 0, 0, [], False
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        start_epoch = resume["epoch"] + 1
        best, best_epoch, bad_epochs = (
            resume["best_metric"],
            resume["best_epoch"],
            resume["bad_epochs"],
        )
        history, stopped = list(resume["history"]), bool(resume["stopped"])
        log.info("training_resumed", from_epoch=resume["epoch"], checkpoint=str(last_path))

    log.info(
        "training_started",
        **({"rank": dist.rank, "world_size": dist.world_size} if dist else {}),
        device=str(device),
        amp=use_amp,
        threads=torch.get_num_threads(),
        train_rows=len(train),
        val_rows=len(val),
        weights=weights_used,
        metric=metric_name,
        start_epoch=start_epoch,
        epochs=t.epochs,
    )
    if main_rank and best_path.exists() and resume is None:
        best_path.unlink()  # a best.pt without a last.pt is from an abandoned start

    net, net_frozen = model, None
    for epoch in range(start_epoch, t.epochs + 1):
        if stopped:
            break
        epoch_started = time.perf_counter()
        # each rank its own stream for what draws from the global RNG in the step (dropout);
        # the data order and the augmentation come from (seed, epoch[, row]) alone
        seed_everything(epoch_seed(t.seed, epoch) + (dist.rank * 7_919 if dist else 0))
        data["generator"].manual_seed(epoch_seed(t.seed, epoch))
        data["sampler"].set_epoch(epoch)
        data["train_ds"].set_epoch_seed(epoch_seed(t.seed, epoch))
        frozen = pretrained and epoch <= t.freeze_backbone_epochs
        set_frozen(model, frozen)
        if dist is not None and frozen is not net_frozen:
            # DDP reduces the parameters that require grad when it is built: rebuilt when
            # the backbone is frozen or unfrozen (it broadcasts rank 0's state, the same)
            net = None
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
            net_frozen = frozen
        row: dict[str, Any] = {"epoch": epoch, "frozen": frozen}
        row.update(
            train_one_epoch(
                model,
                optimizer,
                scheduler,
                scaler,
                data["train_loader"],
                device,
                autocast,
                cfg,
                epoch,
                frozen,
                net=net,
                dist=dist,
            )
        )
        row.update(evaluate(model, data["val_loader"], device, autocast, val, t.target, dist))
        row["seconds"] = time.perf_counter() - epoch_started
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
        if dist is not None:
            from jobs.distributed import broadcast

            row = broadcast(row)  # rank 0's timings; the metrics are the same on every rank
        history.append(row)

        value = row[metric_name]
        improved = _improved(value, best, mode)
        if improved:
            best, best_epoch, bad_epochs = value, epoch, 0
        else:
            bad_epochs += 1
        stopped = bad_epochs >= t.early_stopping_patience
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "spec": spec,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "best_metric": best,
            "best_epoch": best_epoch,
            "metric_name": metric_name,
            "metric_mode": mode,
            "bad_epochs": bad_epochs,
            "stopped": stopped,
            "history": history,
            "config_hash": cfg.config_hash,
            "train_hash": cfg.train_hash,
            "dataset_hash": run.dataset_hash,
            "data_hash": data_hash,
            "model_version": run.model_version,
            "weights_used": weights_used,
            "train_label_mean": float(train.label.mean()),
        }
        if main_rank:
            if improved:
                save_checkpoint(ckpt, best_path)
            write_history(history_path, history)
            save_checkpoint(ckpt, last_path)  # last: its existence means the epoch is complete
            log.info(
                "epoch_finished",
                improved=improved,
                **{k: v for k, v in row.items() if v is not None},
            )
        if dist is not None:
            from jobs.distributed import broadcast

            broadcast()  # every rank past this point: the epoch's checkpoint is saved
        if stopped and main_rank:
            log.info(
                "early_stopped",
                epoch=epoch,
                best_epoch=best_epoch,
                patience=t.early_stopping_patience,
            )
        if epoch_callback is not None:
            epoch_callback(epoch, row)

    if not best_path.exists():
        raise train_data.DataProblem(f"no epoch produced a finite {metric_name}; nothing to keep")
    best_ckpt = train_model.load_weights_only(best_path)
    last_ckpt = train_model.load_weights_only(last_path)
    return {
        # the files' own sha256: what a re-run checks before it trusts "already trained"
        "best_checkpoint_sha256": sha256_file(best_path),
        "last_checkpoint_sha256": sha256_file(last_path),
        "status": "trained",
        "model_version": run.model_version,
        "run_id": run.id,
        "run_dir": str(out_dir),
        "best_checkpoint": str(best_path),
        "last_checkpoint": str(last_path),
        "history_csv": str(history_path),
        "spec": spec,
        "metric": metric_name,
        "best_metric": best_ckpt["best_metric"],
        "best_epoch": best_ckpt["epoch"],
        "epochs_run": last_ckpt["epoch"],
        "early_stopped": bool(last_ckpt["stopped"]),
        "resumed_from_epoch": (resume["epoch"] if resume is not None else None),
        "weights": weights_used,
        "best_weights_sha256": train_model.state_dict_sha256(best_ckpt["model"]),
        "last_weights_sha256": train_model.state_dict_sha256(last_ckpt["model"]),
        "device": str(device),
        "amp": use_amp,
        "threads": torch.get_num_threads(),
        "num_workers": t.num_workers,
        "train_rows": len(train),
        "val_rows": len(val),
        "img_per_s": history[-1]["img_per_s"] if history else None,
        "config_hash": cfg.config_hash,
        "dataset_hash": run.dataset_hash,
        "training_data_hash": data_hash,
        "library_versions": library_versions(),
        **(
            {
                "distributed": {
                    "world_size": dist.world_size,
                    "backend": "nccl" if device.type == "cuda" else "gloo",
                    "per_rank_batch_size": per_rank_batch_size(cfg, dist),
                    "global_batch_size": t.batch_size,
                }
            }
            if dist
            else {}
        ),
        "seconds": round(time.monotonic() - started, 3),
    }


def best_checkpoint_problem(cfg: Config, run: Run) -> str | None:
    """Why the run's ``best.pt`` cannot be trusted as the trained result, or None if it is the
    file the train step recorded: its sha256 (``best_checkpoint_sha256``), or for runs trained
    before that was recorded, the weights hash (``best_weights_sha256``)."""
    best = paths.of(cfg).run(run.model_version).best_checkpoint
    recorded = run.params.get("train") or {}
    if not best.is_file():
        return "is missing"
    if recorded.get("best_checkpoint_sha256"):
        actual = sha256_file(best)
        if actual != recorded["best_checkpoint_sha256"]:
            return (
                f"has sha256 {actual[:16]}..., the run records "
                f"{recorded['best_checkpoint_sha256'][:16]}..."
            )
        return None
    if recorded.get("best_weights_sha256"):
        try:
            weights = train_model.state_dict_sha256(train_model.load_weights_only(best)["model"])
        except (InputError, KeyError, TypeError) as exc:
            return f"does not load ({exc})"
        if weights != recorded["best_weights_sha256"]:
            return "holds other weights than the run records (best_weights_sha256)"
        return None
    return "is not recorded by the run (no train summary)"


def discard_checkpoints(out_dir: Path) -> None:
    """Before retraining from scratch: a ``last.pt`` would resume a run whose best is lost."""
    run_paths = RunPaths(out_dir)
    for path in (run_paths.best_checkpoint, run_paths.last_checkpoint):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def sweep(out_dir: Path) -> None:
    from jobs.artifacts import sweep_temp

    with contextlib.suppress(OSError):
        sweep_temp(out_dir, recursive=False)
