"""The one thread on which a serving engine runs its model, from the warm-up to the last step.

ONNX Runtime's CUDA provider keeps its CUDA graphs, its cuBLAS and cuDNN handles and its count of runs before a
graph is captured per thread (the provider's PerThreadContext, in its source), so a warm-up on one thread does not
warm another. With the warm-up on the main thread and the steps on the scheduler's, `leptonc serve --trace` on the
H100 showed the first pipelined step of each decode batch size taking 8-48 ms (a steady one 0.3-0.5 ms) and the
first prefill 25-40 ms. So the engine checks and warms the bundle on this thread, and its scheduler loop runs here
afterwards.

    device = DeviceThread("leptonc-batching")
    warmed = device.call(slots.warm_up, token)     # runs there, returns (or raises) here
    loop = device.submit(engine_loop)              # a concurrent.futures.Future
    ...
    device.stop()
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Callable


class DeviceThread:
    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, done = job
            if not done.set_running_or_notify_cancel():
                continue
            try:
                done.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
                done.set_exception(exc)

    def submit(self, fn: Callable, *args) -> Future:
        """Run fn(*args) on the thread after what was submitted before; its future."""
        if not self.thread.is_alive():
            raise RuntimeError("the device thread has stopped")
        done: Future = Future()
        self._jobs.put((fn, args, done))
        return done

    def call(self, fn: Callable, *args):
        """fn(*args) on the thread, waited for: its result, or its exception raised here."""
        return self.submit(fn, *args).result()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Finish what was submitted, then end the thread."""
        self._jobs.put(None)
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()


__all__ = ["DeviceThread"]
