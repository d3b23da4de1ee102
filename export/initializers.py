"""Initializer data of a graph rewritten tensor by tensor: the graph is loaded without its external data
(`onnx.load(..., load_external_data=False)`), each weight is read from the source's data file when a rewrite asks
for it, and each new tensor is appended to the output's data file as it is made. Rewriting a multi-GB decoder so
holds about one weight at a time, never the source model and its rewrite side by side.

The output is what `onnx.save(model, path, save_as_external_data=True, location=NAME.data)` writes: tensors of
1024 bytes and more in one data file (no alignment padding), smaller ones embedded; without an output data file
every tensor is embedded, as `onnx.save(model, path)` does.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

EXTERNAL_MIN_BYTES = 1024  # onnx.save's size_threshold: smaller tensors stay in the graph


class Initializers:
    """Reads and writes initializer data for graphs under `source_dir`; new data goes to `out_data` (a file
    created here) or, when it is None, into the graph itself. The default, in-memory, reads and writes tensors
    that hold their data (what onnx.load gives with its external data loaded)."""

    def __init__(self, source_dir: Path | None = None, out_data: Path | None = None):
        self.source_dir, self.out_data = source_dir, out_data
        self._out = open(out_data, "wb") if out_data is not None else None
        self._written: set[str] = set()  # names whose data now lives in out_data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._out is not None:
            self._out.close()

    def array(self, tensor: onnx.TensorProto) -> np.ndarray:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(tensor)
        info = {e.key: e.value for e in tensor.external_data}
        written = tensor.name in self._written
        if written:
            self._out.flush()
        base = self.out_data.parent if written else self.source_dir
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        count = int(info["length"]) // dtype.itemsize
        data = np.fromfile(base / info["location"], dtype=dtype, count=count, offset=int(info.get("offset", 0)))
        return data.reshape(tuple(tensor.dims))

    def loaded(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        """A copy of `tensor` holding its data (for code that reads TensorProtos itself)."""
        return numpy_helper.from_array(self.array(tensor), tensor.name)

    def add(self, graph: onnx.GraphProto, tensor: onnx.TensorProto) -> None:
        """Append `tensor` (holding its data) to graph's initializers, its data moved to the output file."""
        self._store(tensor)
        graph.initializer.append(tensor)

    def new(self, graph: onnx.GraphProto, array: np.ndarray, name: str) -> None:
        self.add(graph, numpy_helper.from_array(array, name))

    def replace(self, tensor: onnx.TensorProto, array: np.ndarray) -> None:
        """Give an initializer of the graph new contents (same name)."""
        tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
        self._store(tensor)

    def finish(self, graph: onnx.GraphProto) -> None:
        """Move every initializer still reading the source's data to the output (the file, or into the graph), then
        drop from the file what graph no longer references: a rewrite may have replaced or removed tensors it wrote
        earlier (the query-scaled QKV weights before their int8 copies: 0.8 GB of InternVL2-2B's decoder)."""
        for tensor in graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL and tensor.name not in self._written:
                tensor.CopyFrom(self.loaded(tensor))
                self._store(tensor)
        if self._out is not None:
            self._compact(graph)

    def _compact(self, graph: onnx.GraphProto) -> None:
        """Rewrite the output file with the referenced tensors only, in graph order, one tensor at a time."""
        self._out.close()
        written = self.out_data.with_name(self.out_data.name + ".uncompacted")
        self.out_data.replace(written)
        with open(written, "rb") as src, open(self.out_data, "wb") as dst:
            for tensor in graph.initializer:
                if tensor.name not in self._written:
                    continue
                info = {e.key: e.value for e in tensor.external_data}
                src.seek(int(info["offset"]))
                offset = dst.tell()
                dst.write(src.read(int(info["length"])))
                for entry in tensor.external_data:
                    if entry.key == "offset":
                        entry.value = str(offset)
        written.unlink()
        self._out = open(self.out_data, "ab")

    def _store(self, tensor: onnx.TensorProto) -> None:
        # sys.getsizeof, as onnx.save measures it: the bytes object's size, header included.
        if (self._out is None or not tensor.HasField("raw_data")
                or sys.getsizeof(tensor.raw_data) < EXTERNAL_MIN_BYTES):
            self._written.discard(tensor.name)
            return
        offset = self._out.tell()
        self._out.write(tensor.raw_data)
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", self.out_data.name), ("offset", offset),
                           ("length", self._out.tell() - offset)):
            tensor.external_data.add(key=key, value=str(value))
        self._written.add(tensor.name)
