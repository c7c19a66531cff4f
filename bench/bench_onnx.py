"""The exported model in onnxruntime against PyTorch eager, and the in-graph resize's cost.

One process, the same inputs for every side: decoded 640x360 RGB originals (the demo world's
size; sky gradients with noise, JPEG-encoded and decoded with ``jobs.images.load_image``).

1. Latency, onnxruntime vs PyTorch eager, per image (batch 1, one image after another) and
   at batch 32:
   - ``full``: what ``airatings export-onnx`` writes, the original in, the resize chain and
     the network inside (``jobs.onnx_export.build_scorer`` / ``export_graph``, simplified);
   - ``net``: the network alone on a 224 x 224 uint8 input (a fixed-size graph exported from
     the same module), the comparison the issue's 3.4-3.9x (batch 32) refers to.
2. The in-graph resize against resizing in Python first: the full graph on the original vs
   Pillow (``resize_short_side`` + ``preprocess``, what the cache and evaluate do) and then
   the fixed-size graph, per image and for 32 images.

Sides alternate in blocks (``--blocks``) so other load on the machine hits them alike; each
figure is the median over blocks. Random weights: latency does not depend on them.

    .venv/bin/python bench/bench_onnx.py            # about a minute on 2 cores
    .venv/bin/python bench/bench_onnx.py --blocks 3 --images 16
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_originals(n: int, w: int, h: int, seed: int = 0) -> list[np.ndarray]:
    from PIL import Image

    from jobs.images import load_image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        top = rng.uniform(40, 255, 3)
        ramp = np.linspace(0, 1, h)[:, None, None]
        img = top * (1 - ramp) + (top * 0.4) * ramp + rng.normal(0, 10, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=88)
        out.append(np.array(load_image(buf.getvalue(), max_pixels=40_000_000)))
    return out


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--backbone", default="mobilenet_v3_small")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--short-side", type=int, default=256)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=360)
    ap.add_argument("--images", type=int, default=32, help="images per block at batch 1")
    ap.add_argument("--reps", type=int, default=3, help="batch-32 runs per block")
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="default: the CPUs available")
    args = ap.parse_args()

    import onnxruntime
    import torch
    from PIL import Image

    from jobs import onnx_export
    from jobs.images import preprocess, resize_short_side
    from jobs.resources import available_cpus
    from jobs.train.model import build_model, raw_scores_from_outputs

    threads = args.threads or available_cpus()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    target, size = "regression", args.size
    net = build_model({"backbone": args.backbone, "target": target, "input_size": size}).eval()
    scorer = onnx_export.build_scorer(net, target, args.short_side, size)

    class Fixed(torch.nn.Module):
        """The network alone: uint8 NHWC size x size -> raw_score."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, image):
            return raw_scores_from_outputs(self.model(image), target)

    fixed = Fixed(net).eval()
    originals = make_originals(max(args.images, 32), args.width, args.height)
    pil = [
        np.array(preprocess(resize_short_side(Image.fromarray(a), args.short_side), size))
        for a in originals
    ]

    full_graph, info = onnx_export.simplify(
        onnx_export.export_graph(scorer, torch.from_numpy(originals[0][None])),
        [np.stack(originals[:2])],
        threads,
    )
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            fixed,
            (torch.from_numpy(pil[0][None]),),
            buf,
            dynamo=False,
            opset_version=onnx_export.OPSET,
            input_names=[onnx_export.INPUT_NAME],
            output_names=[onnx_export.OUTPUT_NAME],
            dynamic_axes={
                onnx_export.INPUT_NAME: {0: "batch"},
                onnx_export.OUTPUT_NAME: {0: "batch"},
            },
        )
    full = onnx_export.ort_session(full_graph.SerializeToString(), threads)
    net_ort = onnx_export.ort_session(buf.getvalue(), threads)

    singles = [a[None] for a in originals[: args.images]]
    singles_pil = [a[None] for a in pil[: args.images]]
    batch = np.stack(originals[:32])
    batch_pil = np.stack(pil[:32])
    pil_images = [Image.fromarray(a) for a in originals[:32]]

    def each(fn, xs):
        return lambda: [fn(x) for x in xs]

    def reps(fn):
        return lambda: [fn() for _ in range(args.reps)]

    def pil_then_graph(images):
        def go():
            xs = np.stack(
                [preprocess(resize_short_side(im, args.short_side), size) for im in images]
            )
            return onnx_export.ort_raw(net_ort, xs)

        return go

    sides: dict[str, tuple[Callable[[], object], int]] = {
        # name: (work, images it scores)
        "full ort b1": (each(lambda x: onnx_export.ort_raw(full, x), singles), len(singles)),
        "full torch b1": (each(lambda x: onnx_export.torch_raw(scorer, x), singles), len(singles)),
        "full ort b32": (reps(lambda: onnx_export.ort_raw(full, batch)), 32 * args.reps),
        "full torch b32": (reps(lambda: onnx_export.torch_raw(scorer, batch)), 32 * args.reps),
        "net ort b1": (each(lambda x: onnx_export.ort_raw(net_ort, x), singles_pil), len(singles)),
        "net torch b1": (
            each(lambda x: onnx_export.torch_raw(fixed, x), singles_pil),
            len(singles),
        ),
        "net ort b32": (reps(lambda: onnx_export.ort_raw(net_ort, batch_pil)), 32 * args.reps),
        "net torch b32": (reps(lambda: onnx_export.torch_raw(fixed, batch_pil)), 32 * args.reps),
        "pil+net ort b1": (
            each(lambda im: pil_then_graph([im])(), pil_images[: args.images]),
            len(singles),
        ),
        "pil+net ort b32": (reps(pil_then_graph(pil_images)), 32 * args.reps),
    }
    for work, _ in sides.values():  # warm-up: first runs allocate and pick kernels
        work()
    per_image: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(args.blocks):
        for name, (work, n) in sides.items():
            per_image[name].append(timed(work) / n * 1000)
    ms = {k: statistics.median(v) for k, v in per_image.items()}

    print(
        f"bench_onnx: {args.backbone} {size}x{size}, originals {args.width}x{args.height}, "
        f"short side {args.short_side}, {threads} threads, median of {args.blocks} blocks; "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; "
        f"simplified graph kept: {info['kept']}"
    )
    print(f"{'':32}{'batch 1 ms/img':>16}{'batch 32 ms/img':>17}")
    rows = [
        ("full graph (resize inside), ORT", "full ort"),
        ("full module, PyTorch eager", "full torch"),
        ("network only 224, ORT", "net ort"),
        ("network only 224, PyTorch eager", "net torch"),
        ("PIL resize + network, ORT", "pil+net ort"),
    ]
    for label, key in rows:
        print(f"{label:32}{ms[key + ' b1']:16.2f}{ms[key + ' b32']:17.2f}")
    print("ratios (higher = the first is faster):")
    for b in ("b1", "b32"):
        print(
            f"  {b}: ORT vs eager, full {ms['full torch ' + b] / ms['full ort ' + b]:.2f}x, "
            f"network only {ms['net torch ' + b] / ms['net ort ' + b]:.2f}x; "
            f"in-graph resize vs PIL first {ms['pil+net ort ' + b] / ms['full ort ' + b]:.2f}x "
            f"(resize cost in graph {ms['full ort ' + b] - ms['net ort ' + b]:.2f} ms/img, "
            f"in PIL {ms['pil+net ort ' + b] - ms['net ort ' + b]:.2f} ms/img)"
        )


if __name__ == "__main__":
    main()
