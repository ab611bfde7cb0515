"""The few CUDA driver calls the pipelined greedy decode needs (ort_cuda.OrtCudaRunner.greedy_tokens).

A stream of our own that ONNX Runtime runs on (its `user_compute_stream` provider option), pinned host buffers,
asynchronous copies and events. They come from libcuda.so.1, which every NVIDIA driver installs, through ctypes:
no PyTorch in the runtime (its CUDA context and caching allocator would count against the device memory that
`leptonc bench` reports), and no extra package. Everything here is in the device's primary context, the one the
CUDA runtime (and so ONNX Runtime) uses.
"""

from __future__ import annotations

import ctypes

import numpy as np

CU_STREAM_NON_BLOCKING = 1
CU_EVENT_DISABLE_TIMING = 2


class CudaDriverError(RuntimeError):
    pass


class CudaDriver:
    """libcuda.so.1, initialized, with `device_id`'s primary context current on the calling thread."""

    def __init__(self, device_id: int = 0):
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise CudaDriverError(f"the CUDA driver library is not loadable ({exc})") from None
        self._check(self.lib.cuInit(0), "cuInit")
        device = ctypes.c_int()
        self._check(self.lib.cuDeviceGet(ctypes.byref(device), device_id), "cuDeviceGet")
        current = ctypes.c_void_p()
        self._check(self.lib.cuCtxGetCurrent(ctypes.byref(current)), "cuCtxGetCurrent")
        self.context = ctypes.c_void_p()
        self._check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.context), device), "cuDevicePrimaryCtxRetain")
        self.device = device
        if current.value != self.context.value:
            self._check(self.lib.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")
        # Calls that only queue work on a stream return at once: made through PyDLL, which keeps Python's lock, so a
        # thread that queues a step does not give the lock away (and wait up to a switch interval to get it back,
        # where other threads are busy) for each of them. Calls that wait (event and stream synchronize) let it go.
        self.queue_lib = ctypes.PyDLL("libcuda.so.1")
        self.queue_lib.cuMemcpyAsync.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
        self.queue_lib.cuEventRecord.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.queue_lib.cuCtxSetCurrent.argtypes = [ctypes.c_void_p]
        self.lib.cuEventSynchronize.argtypes = [ctypes.c_void_p]
        self.lib.cuStreamSynchronize.argtypes = [ctypes.c_void_p]

    def make_current(self) -> None:
        """Make the device's primary context current on the calling thread (a thread other than the one that made
        this driver, such as a serving engine's scheduler, may have none yet)."""
        self._check(self.queue_lib.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")

    def _check(self, status: int, call: str) -> None:
        if status != 0:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(status, ctypes.byref(name))
            raise CudaDriverError(f"{call} failed: {(name.value or b'').decode() or status}")

    def stream(self) -> int:
        s = ctypes.c_void_p()
        self._check(self.lib.cuStreamCreate(ctypes.byref(s), CU_STREAM_NON_BLOCKING), "cuStreamCreate")
        return s.value

    def event(self) -> int:
        e = ctypes.c_void_p()
        self._check(self.lib.cuEventCreate(ctypes.byref(e), CU_EVENT_DISABLE_TIMING), "cuEventCreate")
        return e.value

    def pinned(self, count: int, dtype=np.int64) -> np.ndarray:
        """A numpy array of `count` elements in page-locked host memory (free with free_pinned)."""
        nbytes = max(1, count) * np.dtype(dtype).itemsize
        p = ctypes.c_void_p()
        self._check(self.lib.cuMemHostAlloc(ctypes.byref(p), ctypes.c_size_t(nbytes), 0), "cuMemHostAlloc")
        buf = (ctypes.c_byte * nbytes).from_address(p.value)
        return np.frombuffer(buf, dtype=dtype, count=count)

    def free_pinned(self, array: np.ndarray) -> None:
        self.lib.cuMemFreeHost(ctypes.c_void_p(array.ctypes.data))

    def copy(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """Asynchronous copy in stream order; host or device pointers (unified addressing infers the kind)."""
        self._check(self.queue_lib.cuMemcpyAsync(dst, src, nbytes, stream), "cuMemcpyAsync")

    def record(self, event: int, stream: int) -> None:
        self._check(self.queue_lib.cuEventRecord(event, stream), "cuEventRecord")

    def wait(self, event: int) -> None:
        self._check(self.lib.cuEventSynchronize(event), "cuEventSynchronize")

    def sync(self, stream: int) -> None:
        self._check(self.lib.cuStreamSynchronize(stream), "cuStreamSynchronize")

    def destroy_stream(self, stream: int) -> None:
        self.lib.cuStreamDestroy_v2(ctypes.c_void_p(stream))

    def destroy_event(self, event: int) -> None:
        self.lib.cuEventDestroy_v2(ctypes.c_void_p(event))
