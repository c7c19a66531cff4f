"""Training throughput from the cache vs the in-memory compute limit.

Both sides run the same training step (``jobs.train.engine``: forward, weighted loss,
backward, clipping, AdamW, scheduler) with the same model, batch and memory layout
(uint8 NHWC in -> channels_last inside the model), in the same process:

- in-memory: one batch already decoded as a uint8 tensor, fed again and again (the limit);
- cache: ``jobs.train.data.ManifestDataset`` + DataLoader over 256-px JPEGs written to a temp
  dir by the cache's own encoder (``jobs.images.encode_jpeg`` at ``cache.jpeg_quality``), with
  the training augmentation and real decoding.

The sides alternate in blocks so that other load on the machine hits both alike. The
DataLoader keeps decoding ahead while the in-memory side runs, so each cache block first
consumes, untimed, the batches prefetched meanwhile (workers x prefetch_factor), and each
in-memory block starts after a short pause in which the worker finishes what it has in hand:
neither side is timed while the other one's work spills into it.

Prints img/s for both, the ratio of the totals (goal >= 0.9x) and the median and range of the
per-block ratios. ``--steps N`` for a quick run.

    .venv/bin/python bench/bench_train.py --steps 20
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_jpegs(
    root: Path, n: int, short_side: int, quality: int, subsampling: str | None, seed: int = 0
) -> list[Path]:
    """Noisy sky gradients: more detail than the demo world's renders (larger, slower files)."""
    from PIL import Image

    from jobs.images import encode_jpeg

    rng = np.random.default_rng(seed)
    w, h = int(short_side * 16 / 9), short_side
    paths = []
    for i in range(n):
        top = rng.uniform(40, 255, 3)
        ramp = np.linspace(0, 1, h)[:, None, None]
        img = top * (1 - ramp) + (top * 0.4) * ramp + rng.normal(0, 10, (h, w, 3))
        pic = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        if subsampling is None:  # what the cache writes
            data = encode_jpeg(pic, quality)
        else:
            buf = io.BytesIO()
            pic.save(buf, "JPEG", quality=quality, subsampling=subsampling)
            data = buf.getvalue()
        p = root / f"{i:05d}.jpg"
        p.write_bytes(data)
        paths.append(p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=120, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--short-side", type=int, default=256)
    ap.add_argument("--backbone", default="mobilenet_v3_small")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    ap.add_argument("--block", type=int, default=8, help="steps per interleaved block")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument(
        "--subsampling",
        choices=["4:4:4", "4:2:2", "4:2:0"],
        default=None,
        help="JPEG chroma subsampling (default: what the cache's encoder writes)",
    )
    ap.add_argument(
        "--images",
        type=Path,
        default=None,
        help="use these JPEGs (e.g. artifacts/images/train256 after 'just demo') instead of "
        "generated ones",
    )
    args = ap.parse_args()

    import statistics

    import torch

    from jobs.config import CacheConfig
    from jobs.resources import available_cpus
    from jobs.train import data as train_data
    from jobs.train import engine
    from jobs.train import model as train_model

    cores = available_cpus()
    threads = args.threads or cores
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    spec = {"backbone": args.backbone, "target": "regression", "input_size": args.size}
    model = train_model.build_model(spec).to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def step(x, y, w):
        out = model(x)
        loss = engine.weighted_loss(out, y, w, "regression")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()

    n_img = args.batch * (args.steps + args.warmup)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        quality = CacheConfig().jpeg_quality
        if args.images is not None:
            paths = sorted(args.images.rglob("*.jpg"))[:2048]
            if len(paths) < args.batch:
                ap.error(f"{args.images}: fewer than {args.batch} JPEGs")
            source = f"{len(paths)} files from {args.images}"
        else:
            paths = make_jpegs(
                Path(tmp), min(n_img, 2048), args.short_side, quality, args.subsampling
            )
            source = f"generated, q{quality}/{args.subsampling or 'as the cache writes'}"
        kb = np.mean([p.stat().st_size for p in paths]) / 1e3
        targets = np.random.default_rng(1).uniform(0, 5, (len(paths), 1)).astype(np.float32)
        ds = train_data.ManifestDataset(
            paths, targets, np.ones(len(paths), np.float32), args.size, augment=True
        )
        ds.set_epoch_seed(engine.epoch_seed(0, 1))  # per-row augmentation seeds, as training does

        # in-memory limit: the same batch, decoded once
        xs, ys, ws = zip(*(ds[i] for i in range(args.batch)), strict=True)
        mem_batch = (torch.stack(xs), torch.stack(ys), torch.stack(ws))

        g = torch.Generator().manual_seed(0)
        prefetch = 2
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=args.batch,
            shuffle=True,
            drop_last=True,
            num_workers=args.workers,
            generator=g,
            worker_init_fn=engine.worker_init_for(torch.device("cpu")),
            persistent_workers=args.workers > 0,
            prefetch_factor=prefetch if args.workers else None,
        )
        state = {"it": iter(loader)}

        def next_batch():
            try:
                return next(state["it"])
            except StopIteration:
                state["it"] = iter(loader)
                return next(state["it"])

        for _ in range(args.warmup):
            step(*mem_batch)
            step(*next_batch())
        # Interleave blocks of both sides so that other load on the machine hits them alike.
        block = max(1, min(args.block, args.steps))
        ahead = args.workers * prefetch  # batches the loader decodes during the other side
        mem_s = cache_s = 0.0
        ratios = []
        done = 0
        while done < args.steps:
            k = min(block, args.steps - done)
            time.sleep(0.5)  # the worker finishes the batch in hand: not on the in-memory clock
            t0 = time.perf_counter()
            for _ in range(k):
                step(*mem_batch)
            m = time.perf_counter() - t0
            for _ in range(ahead):  # batches decoded while the in-memory side ran: untimed
                step(*next_batch())
            t0 = time.perf_counter()
            for _ in range(k):
                step(*next_batch())
            c = time.perf_counter() - t0
            mem_s, cache_s = mem_s + m, cache_s + c
            ratios.append(m / c)
            done += k
        mem_ips = args.batch * args.steps / mem_s
        cache_ips = args.batch * args.steps / cache_s
        state.clear()  # stops the workers

        # decode+augment rate of one worker (one torch thread, as the DataLoader sets it)
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        k = min(len(ds), 256)
        for i in range(k):
            ds[i]
        decode_ips = k / (time.perf_counter() - t0)
        torch.set_num_threads(threads)

    print(
        f"bench_train {args.backbone} batch={args.batch} size={args.size} "
        f"cores={cores} threads={threads} workers={args.workers} "
        "layout=uint8 NHWC -> channels_last"
    )
    print(f"  JPEGs: {source}, {kb:.0f} KB each on average")
    print(f"  in-memory compute limit : {mem_ips:8.1f} img/s")
    print(f"  from cache (DataLoader) : {cache_ips:8.1f} img/s")
    print(f"  decode+augment, 1 worker: {decode_ips:8.1f} img/s")
    print(f"  ratio cache / in-memory : {cache_ips / mem_ips:8.2f}x  (goal >= 0.90x)")
    print(
        f"  per-block ratios        : median {statistics.median(ratios):.2f}x, "
        f"range {min(ratios):.2f}-{max(ratios):.2f}x over {len(ratios)} blocks of {block} steps"
    )


if __name__ == "__main__":
    main()
