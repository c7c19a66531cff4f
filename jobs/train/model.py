"""The network for a target: ``Normalize + torchvision backbone + new head``.

Shared by train, evaluate and onnx_export (docs/contracts.md). The wrapper takes either uint8 NHWC
(what the ONNX graph and the scorers feed: RGB pixels after ``jobs.images.preprocess``) or
float NCHW in 0..255, and applies the ImageNet normalisation inside, so the exported graph is
exactly this module.

Outputs (``raw``) and the one mapping to a 0..5 score (``scores_from_outputs``):

- ``regression``: 1 value, the rating itself; score = clamp(raw, 0, 5).
- ``binary``: 1 logit for ``is_good``; score = 5 * sigmoid(raw) (probability scaled to 0..5,
  so the 4.0 gate means p >= 0.8).
- ``distribution``: 6 logits over the ratings 0..5; score = sum_k k * softmax(raw)_k.

Checkpoints are plain dicts read with ``torch.load(weights_only=True)`` only; ``spec`` inside
says how to rebuild the network (backbone, target, input size).
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.errors import InputError
from jobs.images import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    import torch
    from torch import nn

BACKBONES = ("mobilenet_v3_small", "resnet18", "efficientnet_b0")
NUM_OUTPUTS = {"regression": 1, "binary": 1, "distribution": 6}
SCORE_MAPPING = {
    "regression": "clamp(raw, 0, 5)",
    "binary": "5 * sigmoid(raw)",
    "distribution": "sum_k k * softmax(raw)_k, k = 0..5",
}


def _head_slot(backbone: str) -> tuple[str, int | None]:
    """Where the classifier layer sits: (attribute, index in a Sequential or None)."""
    return {
        "mobilenet_v3_small": ("classifier", 3),
        "resnet18": ("fc", None),
        "efficientnet_b0": ("classifier", 1),
    }[backbone]


def weights_file_name(backbone: str) -> str:
    """The file name torchvision's pretrained ImageNet weights have in the torch hub cache."""
    import torchvision

    weights = torchvision.models.get_model_weights(backbone).DEFAULT
    return os.path.basename(weights.url)


def imagenet_weights_candidates(backbone: str, weights_path: Path | None) -> list[Path]:
    """Where to look for pretrained weights: the configured file, else the torch hub cache."""
    import torch

    if weights_path is not None:
        return [Path(weights_path)]
    return [Path(torch.hub.get_dir()) / "checkpoints" / weights_file_name(backbone)]


@functools.cache
def _model_class():
    import torch
    from torch import nn

    class _RatingModel(nn.Module):
        """uint8 NHWC or float NCHW 0..255 -> normalised -> backbone -> head (raw output)."""

        def __init__(self, backbone: nn.Module, spec: dict[str, Any]):
            super().__init__()
            self.spec = dict(spec)
            mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
            # (x / 255 - mean) / std == x * scale + shift
            self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
            self.register_buffer("shift", -mean / std, persistent=False)
            self.backbone = backbone

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.dtype == torch.uint8:
                # NHWC -> NCHW view; memory stays NHWC, i.e. channels_last, no copy.
                x = x.permute(0, 3, 1, 2)
            x = x.float() * self.scale + self.shift
            return self.backbone(x)

        def head(self) -> nn.Module:
            attr, idx = _head_slot(self.spec["backbone"])
            layer = getattr(self.backbone, attr)
            return layer if idx is None else layer[idx]

    return _RatingModel


def build_model(spec: dict[str, Any], *, state_dict_file: Path | None = None) -> nn.Module:
    """Build ``Normalize + backbone + head`` for ``spec`` = {backbone, target, input_size}.

    ``state_dict_file``: torchvision ImageNet weights for the backbone (1000-class head), loaded
    with ``weights_only=True`` before the head is replaced.
    """
    import torchvision
    from torch import nn

    backbone_name, target = spec["backbone"], spec["target"]
    if backbone_name not in BACKBONES:
        raise InputError(f"unknown backbone {backbone_name!r}; choose one of {BACKBONES}")
    if target not in NUM_OUTPUTS:
        raise InputError(f"unknown target {target!r}; choose one of {tuple(NUM_OUTPUTS)}")
    net = torchvision.models.get_model(backbone_name, weights=None)
    if state_dict_file is not None:
        state = load_weights_only(state_dict_file, what="pretrained weights")
        try:
            net.load_state_dict(state)
        except (RuntimeError, TypeError) as exc:
            raise InputError(
                f"{state_dict_file}: not torchvision {backbone_name} ImageNet weights ({exc})"
            ) from None
    attr, idx = _head_slot(backbone_name)
    container = getattr(net, attr)
    old = container if idx is None else container[idx]
    new = nn.Linear(old.in_features, NUM_OUTPUTS[target])
    if idx is None:
        setattr(net, attr, new)
    else:
        container[idx] = new
    return _model_class()(net, spec)


def head_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    return list(model.head().parameters())


def backbone_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    head_ids = {id(p) for p in head_parameters(model)}
    return [p for p in model.parameters() if id(p) not in head_ids]


def raw_scores_from_outputs(
    raw: torch.Tensor, target: str, bins: torch.Tensor | None = None
) -> torch.Tensor:
    """Raw network output (N, k) -> ``raw_score`` (N,): what the exported ONNX graph outputs
    and the calibration (``jobs.calibration``) maps to aiRating. Regression: the predicted
    rating, unclamped; binary: the logit; distribution: the expected rating. ``bins``: the
    ratings 0..5 as a tensor (the ONNX export passes a buffer, so the graph holds a constant)."""
    import torch

    if target in ("regression", "binary"):
        return raw[:, 0]
    if target == "distribution":
        if bins is None:
            bins = torch.arange(6, dtype=raw.dtype, device=raw.device)
        return (torch.softmax(raw, dim=1) * bins).sum(dim=1)
    raise ValueError(target)


def scores_from_outputs(raw: torch.Tensor, target: str) -> torch.Tensor:
    """Raw network output (N, k) -> 0..5 scores (N,). The one mapping (see module doc)."""
    import torch

    raw = raw.float()
    if target == "regression":
        return raw[:, 0].clamp(0.0, 5.0)
    if target == "binary":
        return torch.sigmoid(raw[:, 0]) * 5.0
    if target == "distribution":
        bins = torch.arange(6, dtype=raw.dtype, device=raw.device)
        return (torch.softmax(raw, dim=1) * bins).sum(dim=1)
    raise ValueError(target)


def state_dict_sha256(model_or_state: Any) -> str:
    """A stable hash of the weights (sorted names, dtype, shape and bytes of every tensor)."""
    import torch

    state = model_or_state.state_dict() if hasattr(model_or_state, "state_dict") else model_or_state
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_weights_only(path: Path, *, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)``, no fallback; anything else is refused (exit 2)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"refusing to load {what} {path}: not a plain weights-only file ({first}); "
            f"delete it if it is not yours"
        ) from None


def model_from_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network from a checkpoint written by ``airatings train`` (eval mode, CPU)."""
    ckpt = load_weights_only(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "spec" not in ckpt:
        raise InputError(f"{path}: not an airatings training checkpoint (no 'model'/'spec')")
    model = build_model(ckpt["spec"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, ckpt
