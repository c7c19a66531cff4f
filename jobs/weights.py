"""`airatings weights pull [BACKBONE]`: torchvision's published ImageNet weights into the torch
cache, hash-checked, so `train.weights: imagenet` (the baseline) finds them.

The file is what torchvision's weights API names (``get_model_weights(backbone).DEFAULT``),
downloaded with ``torch.hub.download_url_to_file`` and the sha256 prefix torchvision puts in
every weights file name (``mobilenet_v3_small-047dcff4.pth``), then loaded into the backbone
(``weights_only=True``) before it is renamed into place: a wrong hash, a truncated body or a
file that is not that backbone's weights leaves nothing in the cache.

``--mirror URL`` replaces torchvision's download host (a company mirror, or a test server);
``--url URL`` fetches one weights file by its full URL (its name must carry the hash prefix;
with a BACKBONE it must load into that backbone). ``train.weights_path``, when set, is where
the file goes (and where training looks); else the torch hub cache (``$TORCH_HOME``).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit

from jobs import artifacts
from jobs.errors import InputError, TransientError
from jobs.logs import get_logger

if TYPE_CHECKING:
    from jobs.config import Config

log = get_logger()

TORCHVISION_HOST = "https://download.pytorch.org/models/"


def _hash_prefix(name: str) -> str:
    import torch.hub

    m = torch.hub.HASH_REGEX.search(name)
    if not m or len(m.group(1)) < 8:
        raise InputError(
            f"{name!r} carries no sha256 prefix (torchvision names weights files "
            "<name>-<sha256 prefix>.pth); refusing a download that cannot be checked"
        )
    return m.group(1)


def source_url(backbone: str, mirror: str | None = None) -> str:
    """torchvision's URL for the backbone's default ImageNet weights (on ``mirror`` if given)."""
    import torchvision

    from jobs.train.model import BACKBONES

    if backbone not in BACKBONES:
        raise InputError(f"unknown backbone {backbone!r}; choose one of {BACKBONES}")
    url = torchvision.models.get_model_weights(backbone).DEFAULT.url
    if mirror:
        url = mirror.rstrip("/") + "/" + url.removeprefix(TORCHVISION_HOST)
    return url


def _verify(path: Path, backbone: str | None) -> None:
    """The file loads with ``weights_only=True`` (and into the backbone, when one is named)."""
    from jobs.train.model import build_model, load_weights_only

    if backbone is None:
        load_weights_only(path, what="downloaded weights")
        return
    build_model(
        {"backbone": backbone, "target": "regression", "input_size": 224}, state_dict_file=path
    )


def pull(
    cfg: Config,
    backbone: str | None = None,
    mirror: str | None = None,
    url: str | None = None,
) -> dict[str, Any]:
    """Download, check and place one weights file; ``already_present`` when a valid one is."""
    import torch.hub

    started = time.monotonic()
    if url is None:
        backbone = backbone or cfg.train.backbone
        url = source_url(backbone, mirror)
    elif mirror is not None:
        raise InputError("--url names the file itself: do not pass --mirror with it")
    name = os.path.basename(urlsplit(url).path)
    prefix = _hash_prefix(name)
    final = (
        Path(cfg.train.weights_path)
        if cfg.train.weights_path
        else Path(torch.hub.get_dir()) / "checkpoints" / name
    )
    final.parent.mkdir(parents=True, exist_ok=True)
    artifacts.sweep_temp(final.parent, recursive=False)
    summary = {"backbone": backbone, "url": url, "path": str(final), "sha256_prefix": prefix}
    if final.is_file() and artifacts.sha256_file(final).startswith(prefix):
        return {"status": "already_present", **summary}

    tmp = artifacts.temp_path_for(final)
    try:
        try:
            torch.hub.download_url_to_file(url, str(tmp), hash_prefix=prefix, progress=False)
        except HTTPError as exc:
            if exc.code in (408, 429) or exc.code >= 500:
                raise TransientError(f"{url}: HTTP {exc.code}; try again later") from None
            raise InputError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except (URLError, TimeoutError, ConnectionError) as exc:
            raise TransientError(f"cannot download {url}: {exc}") from None
        except RuntimeError as exc:  # torch.hub's hash check
            raise InputError(f"{url}: {exc}; nothing was written to {final.parent}") from None
        _verify(tmp, backbone)
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    log.info("weights_pulled", path=str(final), url=url)
    return {
        "status": "pulled",
        **summary,
        "bytes": final.stat().st_size,
        "seconds": round(time.monotonic() - started, 3),
    }
