"""The Node scorer (clients/node, what the app's cron runs) against Python's scoring path, per
image, on the same model and the same image bytes.

- Node: ``score()`` of clients/node/src/aiScoring.ts (sharp decode, onnxruntime-node,
  calibration), and its two halves, ``decodeImage()`` and ``scorePixels()``, measured by
  clients/node/bench/latency.ts after a warm-up;
- Python: ``jobs.images.load_image`` + onnxruntime + ``jobs.calibration.apply``, and its halves
  (decode alone, inference + calibration alone), after the same warm-up.

The model: the demo's production version (``--version`` for another; after `just demo`),
verified through ``jobs.registry.load_verified``; the images: its run's first test originals
(``--images``). Both runtimes get the same intra-op threads (``--threads``, default the CPUs
available). The sides alternate in blocks (Python in this process, Node in a fresh process
per block) so other load on the machine hits them alike; each figure is the median over
blocks of the mean per image. Prints ms per image and the ratios (Node / Python: below 1 is
Node faster).

    .venv/bin/python bench/bench_node_scorer.py            # about a minute on 2 cores
    .venv/bin/python bench/bench_node_scorer.py --quick
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
NODE_DIR = ROOT / "clients" / "node"


def node_block(model_dir: Path, images: list[Path], threads: int, rounds: int) -> dict:
    cmd = [
        "node",
        str(NODE_DIR / "dist" / "bench" / "latency.js"),
        "--model-dir",
        str(model_dir),
        "--threads",
        str(threads),
        "--rounds",
        str(rounds),
        *map(str, images),
    ]
    out = subprocess.run(cmd, cwd=NODE_DIR, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    ap.add_argument("--version", default=None, help="default: the production alias")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="passes over the images per block")
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="default: the CPUs available")
    ap.add_argument("--quick", action="store_true", help="8 images, 2 rounds, 2 blocks")
    args = ap.parse_args()
    if args.quick:
        args.images, args.rounds, args.blocks = 8, 2, 2

    import onnxruntime as ort
    import PIL
    from node_fixture import pick_images

    from jobs import calibration, db, registry
    from jobs.config import load_config
    from jobs.images import load_image
    from jobs.resources import available_cpus

    if not shutil.which("node") or not (NODE_DIR / "node_modules").is_dir():
        sys.exit(
            "bench_node_scorer: needs node and clients/node/node_modules (npm ci --ignore-scripts)"
        )
    subprocess.run(["npm", "run", "--silent", "build"], cwd=NODE_DIR, check=True)

    threads = args.threads or available_cpus()
    cfg = load_config(args.config)
    version = args.version
    if version is None:
        with db.connect(cfg, autocommit=True) as conn:
            version = registry.current(conn, cfg)
        if version is None:
            sys.exit("bench_node_scorer: no production model; run 'just demo' or pass --version")
    onnx_path, card = registry.load_verified(cfg, version)
    images = pick_images(cfg, version, first=args.images, near=0)
    data = [p.read_bytes() for p in images]
    knots = card["calibration"]
    inp, outp = card["inputs"][0]["name"], card["outputs"][0]["name"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(
        onnx_path.read_bytes(), sess_options=opts, providers=["CPUExecutionProvider"]
    )
    max_pixels, formats = cfg.cache.max_pixels, tuple(cfg.cache.formats)

    def decode(b: bytes) -> np.ndarray:
        return np.asarray(load_image(b, max_pixels=max_pixels, formats=formats))

    def infer(pixels: np.ndarray) -> float:
        raw = session.run([outp], {inp: pixels[None]})[0][0]
        return float(calibration.apply(knots, raw))

    decoded = [decode(b) for b in data]
    python_work = {
        "score_ms": lambda i: infer(decode(data[i])),
        "decode_ms": lambda i: decode(data[i]),
        "infer_ms": lambda i: infer(decoded[i]),
    }

    def python_block() -> dict:
        out = {}
        for name, work in python_work.items():
            total = 0.0
            for _ in range(args.rounds):
                for i in range(len(data)):
                    t = time.perf_counter()
                    work(i)
                    total += time.perf_counter() - t
            out[name] = total / (args.rounds * len(data)) * 1000
        return out

    for work in python_work.values():  # warm-up, as the Node side does
        for i in range(len(data)):
            work(i)
    blocks: dict[str, list[dict]] = {"python": [], "node": []}
    for _ in range(args.blocks):
        blocks["python"].append(python_block())
        blocks["node"].append(node_block(onnx_path.parent, images, threads, args.rounds))
    ms = {
        side: {k: statistics.median(b[k] for b in runs) for k in runs[0]}
        for side, runs in blocks.items()
    }
    node_version = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout
    shape = decoded[0].shape
    print(
        f"bench_node_scorer: {version}, {len(data)} test originals ({shape[1]}x{shape[0]} "
        f"JPEG), {threads} threads, {args.rounds} rounds x {args.blocks} blocks (median); "
        f"node {node_version.strip()} (onnxruntime-node, sharp), python onnxruntime "
        f"{ort.__version__}, Pillow {PIL.__version__}"
    )
    print(f"{'ms per image':28}{'Node':>10}{'Python':>10}{'Node/Python':>14}")
    for label, key in (
        ("score (decode+infer+cal)", "score_ms"),
        ("decode only", "decode_ms"),
        ("inference + calibration", "infer_ms"),
    ):
        n, p = ms["node"][key], ms["python"][key]
        print(f"{label:28}{n:10.2f}{p:10.2f}{n / p:13.2f}x")


if __name__ == "__main__":
    main()
