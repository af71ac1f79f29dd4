"""The model a command names (MODEL: an ONNX/QONNX file or a zoo model name) and what its file
records: its bytes as OUT/model.onnx will hold them (`model_bytes`, external tensor data
embedded), its layer IR (`load_graph`), a new classifier head (`with_new_head`, `--classes K`),
its preprocessing (`model_preprocess`: --preprocess, else the file's metadata, else the default
with one notice) and its class names (`model_class_names`). `bnnc compile` writes what these give
into OUT/ (runtime/outdir.py).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError

from ..compiler.config import make_config
from ..compiler.errors import BnncWarning, ConfigError, ModelError
from ..compiler.export import export_onnx
from ..compiler.frontend import load_model
from ..compiler.head import new_head
from ..compiler.ir import Graph
from ..compiler.preprocess import DEFAULT as DEFAULT_PREPROCESS
from ..compiler.preprocess import DEFAULT_NOTICE, Preprocess, class_names_from_model, \
    parse_preprocess
from ..compiler.preprocess import from_model as preprocess_from_model
from ..compiler.zoo import ZOO, build_zoo_model
from . import reference as ref


def model_bytes(model: str, *, width: float | None = None) -> bytes:
    """The bytes of an ONNX file (external tensor data embedded, so OUT/model.onnx stands alone),
    or of a zoo model built with `width`."""
    path = Path(model)
    if path.is_file():
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ModelError(f"cannot read model file {path}: {err.strerror or err}") from None
        try:
            proto = onnx.load_model_from_string(data)
        except Exception:       # load_graph has already said what is wrong with such a file
            return data
        if not any(t.data_location == onnx.TensorProto.EXTERNAL
                   for t in proto.graph.initializer):
            return data
        try:
            onnx.load_external_data_for_model(proto, str(path.parent))
            return proto.SerializeToString(deterministic=True)
        except Exception as err:
            raise ModelError(f"{path}: cannot embed its external tensor data ({err})",
                             hint="keep the data file next to the .onnx file; models over "
                                  "2 GiB cannot be embedded") from None
    if model in ZOO:
        kw = {} if width is None else {"width": width}
        return build_zoo_model(model, **kw).SerializeToString(deterministic=True)
    raise ModelError(f"{model}: no such file, and not a zoo model name")


def load_graph(model: str, *, width: float | None = None, image_size: int | None = None) -> Graph:
    """An ir.Graph from an ONNX file or a zoo name (zoo names take --width / --image-size)."""
    path = Path(model)
    if path.is_file():
        if width is not None or image_size is not None:
            raise ConfigError(f"--width/--image-size shape zoo models only; {model} is a file",
                              hint="drop them, or pass a zoo name such as 'cnv'")
        return load_model(path)
    if model in ZOO:
        kw: dict[str, Any] = {} if width is None else {"width": width}
        if image_size is not None:
            kw["image_size"] = image_size
        return load_model(build_zoo_model(model, **kw))
    raise ModelError(f"{model}: no such file, and not a zoo model name",
                     hint=f"zoo models: {', '.join(ZOO)}")


def with_new_head(graph: Graph, classes: int, seed: int) -> tuple[Graph, bytes]:
    """`--classes K`: `compiler.head.new_head(graph, K, seed)` and the QONNX bytes that stand for
    it as OUT/model.onnx (latent weights, the file's batch norms as they were; `bnnc run` and
    `bnnc export` re-import it), with the graph re-imported from those bytes."""
    g = new_head(graph, classes, seed)
    std = make_config("standard")
    data = export_onnx(g, std, ref.init_state(g, std).tensors, fmt="qonnx").SerializeToString(
        deterministic=True)
    return load_model(onnx.load_model_from_string(data), name=g.name), data


def model_preprocess(source: bytes, model: str, spec: str | None) -> Preprocess:
    """The preprocessing of a model: `spec` (--preprocess) when given, else what the file records
    (ONNX metadata, compiler/preprocess.py), else the default with one notice (a BnncWarning the
    CLI prints as one line)."""
    if spec is not None:
        return parse_preprocess(spec)
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(source)
    except DecodeError:               # the frontend names what is wrong with the file
        return DEFAULT_PREPROCESS
    found = preprocess_from_model(proto)
    if found is None:
        warnings.warn(BnncWarning(DEFAULT_NOTICE.format(model=Path(model).name)
                                  .removeprefix("notice: ")), stacklevel=2)
        return DEFAULT_PREPROCESS
    return found


def model_class_names(source: bytes) -> tuple[str, ...] | None:
    """The class names a model file records (an export's "bnnc.classes" metadata), or None."""
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(source)
    except DecodeError:
        return None
    return class_names_from_model(proto)
