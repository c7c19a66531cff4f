"""Training throughput from the cache vs the in-memory compute limit.

Both sides run the same training step (``jobs.train.engine``: forward, weighted loss,
backward, clipping, AdamW, scheduler) with the same model, batch and memory layout
(uint8 NHWC in -> channels_last inside the model), in the same process:

- in-memory: one batch already decoded as a uint8 tensor, fed again and again (the limit);
- cache: ``jobs.train.data.ManifestDataset`` + DataLoader over 256-px JPEGs written to a temp
  dir, with the training augmentation and real decoding.

Prints img/s for both and the ratio (goal >= 0.9x). ``--steps N`` for a quick run.

    .venv/bin/python bench/bench_train.py --steps 20
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_jpegs(root: Path, n: int, short_side: int, seed: int = 0) -> list[Path]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = int(short_side * 16 / 9), short_side
    paths = []
    for i in range(n):
        top = rng.uniform(40, 255, 3)
        ramp = np.linspace(0, 1, h)[:, None, None]
        img = top * (1 - ramp) + (top * 0.4) * ramp + rng.normal(0, 10, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=92)
        p = root / f"{i:05d}.jpg"
        p.write_bytes(buf.getvalue())
        paths.append(p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=40, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--short-side", type=int, default=256)
    ap.add_argument("--backbone", default="mobilenet_v3_small")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    ap.add_argument("--block", type=int, default=10, help="steps per interleaved block")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = ap.parse_args()

    import torch

    from jobs.train import data as D
    from jobs.train import engine
    from jobs.train import model as M

    cores = len(os.sched_getaffinity(0))
    threads = args.threads or cores
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    spec = {"backbone": args.backbone, "target": "regression", "input_size": args.size}
    model = M.build_model(spec).to(memory_format=torch.channels_last)
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
        paths = make_jpegs(Path(tmp), min(n_img, 2048), args.short_side)
        targets = np.random.default_rng(1).uniform(0, 5, (len(paths), 1)).astype(np.float32)
        ds = D.ManifestDataset(
            paths, targets, np.ones(len(paths), np.float32), args.size, augment=True
        )

        # in-memory limit: the same batch, decoded once
        xs, ys, ws = zip(*(ds[i] for i in range(args.batch)), strict=True)
        mem_batch = (torch.stack(xs), torch.stack(ys), torch.stack(ws))

        g = torch.Generator().manual_seed(0)
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=args.batch,
            shuffle=True,
            drop_last=True,
            num_workers=args.workers,
            generator=g,
            worker_init_fn=engine.worker_init_for(torch.device("cpu")),
            persistent_workers=args.workers > 0,
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
        mem_s = cache_s = 0.0
        done = 0
        while done < args.steps:
            k = min(block, args.steps - done)
            t0 = time.perf_counter()
            for _ in range(k):
                step(*mem_batch)
            mem_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(k):
                step(*next_batch())
            cache_s += time.perf_counter() - t0
            done += k
        mem_ips = args.batch * args.steps / mem_s
        cache_ips = args.batch * args.steps / cache_s
        state.clear()  # stops the workers

        # decode-only rate of one process (what a worker must sustain)
        t0 = time.perf_counter()
        k = min(len(ds), 256)
        for i in range(k):
            ds[i]
        decode_ips = k / (time.perf_counter() - t0)

    print(
        f"bench_train {args.backbone} batch={args.batch} size={args.size} jpeg_short_side={args.short_side} "
        f"cores={cores} threads={threads} workers={args.workers} layout=uint8 NHWC -> channels_last"
    )
    print(f"  in-memory compute limit : {mem_ips:8.1f} img/s")
    print(f"  from cache (DataLoader) : {cache_ips:8.1f} img/s")
    print(f"  decode+augment, 1 proc  : {decode_ips:8.1f} img/s")
    print(f"  ratio cache / in-memory : {cache_ips / mem_ips:8.2f}x  (goal >= 0.90x)")


if __name__ == "__main__":
    main()
