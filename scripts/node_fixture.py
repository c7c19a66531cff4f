"""Write the Node scorer's test fixture from a registered model, to run clients/node's tests on
their own (tests/test_node_scorer.py writes its own from a freshly registered test model).

    .venv/bin/python scripts/node_fixture.py            # the demo's production model
    .venv/bin/python scripts/node_fixture.py --version demo_v2_2026_12_01 --near 8

After `just demo`: the version the ``production`` alias names (``--version`` for another),
verified through ``jobs.registry.load_verified``; its run's first test originals and those
nearest the threshold (``tests/node_fixture.py``: ``pick_images``, ``write_fixture``, the one
implementation) into ``clients/node/test-fixture/`` (gitignored there), replaced whole. Prints
the command that runs the Node tests on it. The embedded PostgreSQL starts on demand as for
any job. Exit 2 when there is no such model, 75 when the database is unreachable.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from node_fixture import pick_images, write_fixture  # noqa: E402

from jobs import db, registry  # noqa: E402
from jobs.config import load_config  # noqa: E402
from jobs.errors import InputError, JobError  # noqa: E402

NODE_DIR = ROOT / "clients" / "node"
DEFAULT_OUT = NODE_DIR / "test-fixture"


def build(config: Path, version: str | None, out: Path, first: int, near: int) -> dict:
    cfg = load_config(config)
    if version is None:
        registry.require_tables(cfg)
        with db.connect(cfg, autocommit=True) as conn:
            version = registry.current(conn, cfg)
        if version is None:
            raise InputError(
                f"no model is promoted to production in the database of {config}; run "
                "'just demo' first, or pass --version"
            )
    onnx_path, card = registry.load_verified(cfg, version)
    images = pick_images(cfg, version, first=first, near=near)
    if out.exists() and not (out / "reference.json").is_file():
        raise InputError(f"{out} exists and is not a fixture; refusing to replace it")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ref = write_fixture(onnx_path.parent, images, tmp, max_pixels=cfg.cache.max_pixels)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return ref


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml")
    ap.add_argument("--version", default=None, help="default: the production alias")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--first", type=int, default=4, help="test originals in manifest order")
    ap.add_argument("--near", type=int, default=4, help="test originals nearest the threshold")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    try:
        ref = build(args.config, args.version, out, args.first, args.near)
    except JobError as exc:
        print(f"node_fixture: {exc}", file=sys.stderr)
        return exc.exit_code
    originals = [e for e in ref["images"] if e["name"].startswith("orig")]
    near = min(originals, key=lambda e: abs(e["margin"]))
    print(
        f"fixture for {ref['model_version']}: {len(ref['images'])} images "
        f"({len(originals)} test originals; nearest the threshold {ref['threshold']:g}: "
        f"{near['name']} at aiRating {near['ai_rating']:.4f}), "
        f"{len(ref['rejects'])} bad files, {len(ref['calibration_grid']['raw'])} calibration points"
    )
    print(f"cd {NODE_DIR} && AIR_NODE_FIXTURE={out} npm test")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
