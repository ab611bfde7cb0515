"""One batch size's K/V cache for the I/O-binding runner (leptonc/runtime/ort_cuda.py): a single zeroed device
allocation that every layer's past and present are bound to by address, so GroupQueryAttention (or leptonc's
CachedAttention) writes the new entries in place."""

from __future__ import annotations

from typing import Iterable, Protocol

import numpy as np

from leptonc.errors import InputError


class KvBlockOwner(Protocol):
    """What a block needs from its runner (leptonc/runtime/ort_cuda.py's OrtCudaRunner): the cache's
    shape and dtype, the device, the past/present names per layer and a zeros session on its provider."""

    kv_dtype: np.dtype
    kv_heads: int
    capacity: int
    head_dim: int
    num_layers: int
    device_type: str
    device_id: int

    def _kv_names(self) -> Iterable[tuple[str, str]]: ...

    def _zeros_session(self): ...


class KvBlock:
    """One batch size's K/V cache: a single zeroed allocation, [2 x layers, batch, kv_heads, capacity,
    head_dim], bound to the graph's past/present names by address (a layer's rows r0:r1 are contiguous).

    The block is the output of a one-node ConstantOfShape session on the runner's provider, so it comes
    from an ONNX Runtime arena that allocates exactly what is asked (kSameAsRequested). An OrtValue made
    from Python (`ortvalue_from_numpy`) would come from the Python module's own device arena, which grows
    in powers of two: on the H100 the first batch-16 prefill of llama-1b-shape (a 640 MiB block) raised
    device memory by 1,082 MiB, consistent with a 1 GiB region."""

    def __init__(self, runner: KvBlockOwner, batch: int):
        self.batch, self.dtype = batch, runner.kv_dtype
        self.row_shape = (runner.kv_heads, runner.capacity, runner.head_dim)
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        self.names = list(runner._kv_names())
        self.device_type, self.device_id = runner.device_type, runner.device_id
        shape = np.asarray([2 * runner.num_layers, batch, *self.row_shape], np.int64)
        session = runner._zeros_session()
        binding = session.io_binding()
        binding.bind_cpu_input("shape", shape)
        binding.bind_output("zeros", self.device_type, self.device_id)
        try:
            session.run_with_iobinding(binding)
        except RuntimeError as exc:
            if "allocate" not in str(exc).lower():
                raise
            need = 2 * runner.num_layers * batch * self.row_bytes
            raise InputError(
                f"the KV cache for batch {batch} at this bundle's capacity of {runner.capacity} tokens needs "
                f"{need / 2**30:.2f} GiB of {'device' if self.device_type == 'cuda' else 'host'} memory, and "
                "that much could not be allocated",
                hint="run fewer prompts at once, or recompile with a smaller --max-seq") from None
        self.value = binding.get_outputs()[0]  # owns the memory; zeros, never uninitialized (0 x NaN is NaN)
        self.base = self.value.data_ptr()

    def bind(self, binding, rows: tuple[int, int] | None = None) -> None:
        r0, r1 = rows or (0, self.batch)
        shape = [r1 - r0, *self.row_shape]
        for j, (past, present) in enumerate(self.names):
            ptr = self.base + (j * self.batch + r0) * self.row_bytes
            binding.bind_input(past, self.device_type, self.device_id, self.dtype, shape, ptr)
            binding.bind_output(present, self.device_type, self.device_id, self.dtype, shape, ptr)

