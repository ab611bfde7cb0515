"""Loading the exported graph for the passes and saving the result, without holding the weights twice.

The export writes weights to one external-data file. Here every initializer becomes a constant whose
values are read from that file only when a pass asks for them (`ExternalValues`); a weight no pass
touches is never read into memory: its bytes are streamed from the old data file to the new one at
save time. This keeps models over 2 GB (peak host memory under 2.5x the weights) compiling.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto
from onnx_graphsurgeon.ir.tensor import LazyValues

DATA_ALIGN = 4096
INLINE_LIMIT = 1024  # bytes: smaller tensors stay inside model.onnx
_COPY_CHUNK = 1 << 24


def _external_info(tensor: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


class ExternalValues(LazyValues):
    """Values of an initializer stored in an external-data file, read on demand (not cached by us)."""

    def __init__(self, tensor: TensorProto, base_dir: Path):
        super().__init__(tensor)
        info = _external_info(tensor)
        self.path = Path(base_dir) / info["location"]
        self.offset = int(info.get("offset", 0))
        self.length = int(info["length"])

    def load(self) -> np.ndarray:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(self.tensor.data_type)
        count = self.length // np.dtype(dtype).itemsize
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            array = np.fromfile(f, dtype=dtype, count=count)
        return array.reshape(tuple(self.tensor.dims))


def read_values(const: gs.Constant) -> np.ndarray:
    """A constant's values without caching them on the graph (a pass that only inspects a weight
    should not keep a copy of it alive)."""
    if isinstance(const._values, LazyValues):
        return const._values.load()
    return np.asarray(const.values)


def load_graph(model_path: Path) -> gs.Graph:
    model = onnx.load(str(model_path), load_external_data=False)
    graph = gs.import_onnx(model)
    del model
    base = Path(model_path).parent
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and isinstance(t._values, LazyValues) \
                and t._values.tensor.data_location == TensorProto.EXTERNAL:
            t._values = ExternalValues(t._values.tensor, base)
    return graph


def save_graph(graph: gs.Graph, path: Path, source_dir: Path) -> None:
    """Export `graph` to `path` + `path.data`: untouched external weights are copied file to file,
    new or rewritten ones are written from memory and dropped from the proto as they go."""
    model = gs.export_onnx(graph.cleanup().toposort())
    data_path = path.with_name(path.name + ".data")
    sources: dict[Path, object] = {}
    try:
        with open(data_path, "wb") as out:
            for tensor in model.graph.initializer:
                _place(tensor, out, data_path.name, Path(source_dir), sources)
    finally:
        for f in sources.values():
            f.close()
    onnx.save_model(model, str(path))


def _place(tensor: TensorProto, out, location: str, source_dir: Path, sources: dict) -> None:
    external = tensor.data_location == TensorProto.EXTERNAL and not tensor.HasField("raw_data")
    if not external:
        # A rewritten constant may carry its source's EXTERNAL flag with its bytes now inline.
        tensor.data_location = TensorProto.DEFAULT
        del tensor.external_data[:]
        if not tensor.HasField("raw_data"):
            if tensor.ByteSize() < INLINE_LIMIT:
                return
            # typed fields (float_data, ...): normalise to raw bytes first
            tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor), tensor.name))
        if len(tensor.raw_data) < INLINE_LIMIT:
            return
    pad = (-out.tell()) % DATA_ALIGN
    if pad:
        out.write(b"\0" * pad)
    offset = out.tell()
    if external:
        info = _external_info(tensor)
        src_path = source_dir / info["location"]
        src = sources.get(src_path) or sources.setdefault(src_path, open(src_path, "rb"))
        src.seek(int(info.get("offset", 0)))
        remaining = length = int(info["length"])
        while remaining:
            chunk = src.read(min(_COPY_CHUNK, remaining))
            if not chunk:
                raise OSError(f"{src_path} ends before tensor {tensor.name}'s data")
            out.write(chunk)
            remaining -= len(chunk)
    else:
        length = len(tensor.raw_data)
        out.write(tensor.raw_data)
        tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
