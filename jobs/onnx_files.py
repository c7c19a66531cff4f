"""Reading ONNX files safely: the one loader every step uses (export-onnx's own check, the
registry, later the scorer). An ONNX file may keep tensors in external files named by a
relative path inside it; a crafted one can point anywhere on disk, so such data is read only
from inside the model's own folder (docs/faults.md 19-20).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.artifacts import sha256_file
from jobs.errors import InputError

if TYPE_CHECKING:
    import onnx


def external_tensor_protos(model: Any) -> list[Any]:
    """The TensorProtos whose data an ONNX model keeps outside itself (initializers, sparse
    initializers, constant attributes, subgraphs, functions)."""
    import onnx

    found: list[Any] = []

    def tensor(t: Any) -> None:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            found.append(t)

    def attributes(attrs: Any) -> None:
        for attr in attrs:
            if attr.type == onnx.AttributeProto.TENSOR:
                tensor(attr.t)
            elif attr.type == onnx.AttributeProto.TENSORS:
                for t in attr.tensors:
                    tensor(t)
            elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                tensor(attr.sparse_tensor.values)
            elif attr.type == onnx.AttributeProto.GRAPH:
                graph(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    graph(g)

    def graph(g: Any) -> None:
        for t in g.initializer:
            tensor(t)
        for sp in g.sparse_initializer:
            tensor(sp.values)
        for node in g.node:
            attributes(node.attribute)

    graph(model.graph)
    for fn in model.functions:
        for node in fn.node:
            attributes(node.attribute)
    return found


def external_tensors(model: Any) -> list[str]:
    """Names of the tensors whose data the model keeps outside itself."""
    return [t.name for t in external_tensor_protos(model)]


def load_checked(path: str | Path, *, expected_sha256: str | None = None) -> onnx.ModelProto:
    """Load an ONNX file, refusing (InputError) one whose external data would be read from
    outside its own folder (absolute locations, ``..``, symlinks leading out) and, with
    ``expected_sha256``, one whose bytes are not the recorded ones."""
    import onnx

    path = Path(path)
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise InputError(f"{path}: sha256 does not match the recorded {expected_sha256}")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX file
        raise InputError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})"
        ) from None
    folder = path.parent.resolve()
    external = False
    for tensor in external_tensor_protos(model):
        external = True
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(folder):
            raise InputError(
                f"{path}: tensor {tensor.name!r} has external data at {location!r}, outside the "
                f"model's folder {folder}; refusing to load it"
            )
        if not target.is_file():
            raise InputError(f"{path}: external data {location!r} of {tensor.name!r} is missing")
    if external:
        onnx.load_external_data_for_model(model, str(folder))
    return model


def self_contained(data: bytes, label: str | Path) -> onnx.ModelProto:
    """An ONNX model from ``data`` that keeps every tensor inside itself (a registered model is
    one file); InputError naming ``label`` otherwise, or when it is not ONNX at all."""
    import onnx

    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf's DecodeError: not ONNX
        raise InputError(f"{label}: not a readable ONNX model ({type(exc).__name__})") from None
    external = external_tensors(model)
    if external:
        raise InputError(
            f"{label}: tensors {external[:5]} keep their data outside the file; a registered "
            "model is one self-contained file"
        )
    return model
