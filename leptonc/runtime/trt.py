"""The TensorRT runner: a serialized engine (`.plan`) on the GPU, I/O bound to device buffers.

One execution context per optimization profile (0 = prefill, 1 = decode, as `targets/backends/tensorrt.py`
builds them); each call picks the context whose profile covers the call's shapes. Buffers are torch
CUDA tensors; the KV cache stays on the GPU between steps (`present.*` of one step is bound as
`past_key_values.*` of the next). Version-compatible engines load in the full runtime with host code
allowed, or in the lean runtime (`tensorrt_lean`) where the full one is not installed.

Uses the TensorRT 10/11 name-based API (`set_input_shape`, `set_tensor_address`,
`execute_async_v3`); nothing here is imported until a runner is opened.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from leptonc.errors import BackendUnavailableError, BundleError, InputError
from leptonc.graph_contract import ATTENTION_MASK, INPUT_IDS, LOGITS, POSITION_IDS, cache_layers, past_key, past_value, \
    present_names
from leptonc.runtime.base import Runner, positions_from_mask

_TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
                 "BOOL": "bool", "INT8": "int8", "UINT8": "uint8", "FP8": "float8_e4m3fn"}
_NP_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64"}


def load_runtime(version_compatible: bool):
    """(trt module, which) — the full runtime, or the lean one for version-compatible engines."""
    try:
        import tensorrt as trt

        return trt, "full"
    except Exception as full_exc:
        if version_compatible:
            try:
                import tensorrt_lean as trt

                return trt, "lean"
            except Exception:
                pass
        hint = ("pip install tensorrt (or tensorrt-lean for version-compatible engines) on a machine with an "
                "NVIDIA GPU")
        raise BackendUnavailableError(
            f"running a TensorRT engine needs the TensorRT runtime, which is not available here "
            f"({type(full_exc).__name__}: {full_exc})", hint=hint) from None


class TrtRunner(Runner):
    device = "cuda"

    def __init__(self, plan_path: Path, engine_info: dict, limits: dict):
        self.info = engine_info
        trt, self.runtime_kind = load_runtime(bool(engine_info.get("version_compatible")))
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a hard dependency
            raise BackendUnavailableError("the TensorRT runner needs torch for its GPU buffers") from None
        if not torch.cuda.is_available():
            raise BackendUnavailableError("no CUDA GPU is visible here; a TensorRT engine runs only on a GPU",
                                          hint="run on the GPU the engine was built for")
        self.trt, self.torch = trt, torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        if engine_info.get("version_compatible") and hasattr(self.runtime, "engine_host_code_allowed"):
            self.runtime.engine_host_code_allowed = True  # version-compatible plans carry their lean runtime
        data = Path(plan_path).read_bytes()
        self.engine = self.runtime.deserialize_cuda_engine(data)
        del data
        if self.engine is None:
            raise BundleError(f"TensorRT could not deserialize {plan_path} (built by another TensorRT version or "
                              "for another GPU)", hint="recompile it on this machine")
        self.stream = torch.cuda.Stream()
        self.contexts = []
        for p in range(self.engine.num_optimization_profiles):
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(p, self.stream.cuda_stream)
            self.contexts.append(ctx)
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        io = engine_info.get("io") or {}
        self.num_layers = io.get("num_layers") or len(cache_layers(self.inputs))
        kv = self.engine.get_tensor_shape(past_key(0))
        self.kv_heads = io.get("num_kv_heads") or kv[1]
        self.head_dim = io.get("head_dim") or kv[3]
        self.vocab_size = io.get("vocab_size") or self.engine.get_tensor_shape(LOGITS)[-1]
        self.kv_dtype = self._dtype(past_key(0))
        # The bundle's limits, never more than the engine's profiles allow (a mismatch would otherwise
        # surface as a TensorRT shape error in the middle of a generation).
        hi_batch = hi_seq = 1
        for p in range(self.engine.num_optimization_profiles):
            hi = self.engine.get_tensor_profile_shape(ATTENTION_MASK, p)[2]
            hi_batch, hi_seq = max(hi_batch, hi[0]), max(hi_seq, hi[1])
        self.max_batch = min(int(limits["max_batch"]), hi_batch)
        self.max_sequence = min(int(limits["max_sequence"]), hi_seq)
        self._past: list = []
        self._mask = None
        self._positions = None
        self._dummy = torch.empty(1, dtype=torch.uint8, device="cuda")  # address for zero-size tensors

    @classmethod
    def from_plan(cls, path: Path) -> "TrtRunner":
        """A bare engine: the I/O spec and limits come from the engine itself."""
        if not path.is_file():
            raise InputError(f"{path} does not exist")
        trt, _ = load_runtime(True)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if hasattr(runtime, "engine_host_code_allowed"):
            runtime.engine_host_code_allowed = True
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BundleError(f"TensorRT could not deserialize {path}", hint="rebuild the engine with this TensorRT")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        layers = cache_layers(names)
        if not layers or INPUT_IDS not in names or LOGITS not in names:
            raise InputError(f"{path} is not a leptonc-style decoder engine (needs input_ids, "
                             "past_key_values.N.key/value, logits)")
        kv = engine.get_tensor_shape(past_key(0))
        io = {"num_layers": len(layers), "num_kv_heads": kv[1], "head_dim": kv[3],
              "vocab_size": engine.get_tensor_shape(LOGITS)[-1],
              "kv_dtype": _NP_NAMES.get(engine.get_tensor_dtype(past_key(0)).name, "float16")}
        max_batch = max_seq = 1
        for p in range(engine.num_optimization_profiles):
            hi = engine.get_tensor_profile_shape(ATTENTION_MASK, p)[2]
            max_batch, max_seq = max(max_batch, hi[0]), max(max_seq, hi[1])
        info = {"io": io, "version_compatible": True}
        del engine, runtime
        return cls(path, info, {"max_batch": max_batch, "max_sequence": max_seq})

    # -- helpers --
    def _dtype(self, name: str):
        return getattr(self.torch, _TORCH_DTYPES[self.engine.get_tensor_dtype(name).name])

    def _context_for(self, shapes: dict[str, tuple]) -> int:
        """The first profile whose (min, max) ranges hold every input shape."""
        for p, _ in enumerate(self.contexts):
            ok = True
            for name, shape in shapes.items():
                lo, _, hi = self.engine.get_tensor_profile_shape(name, p)
                if any(not (a <= s <= b) for a, s, b in zip(lo, shape, hi)):
                    ok = False
                    break
            if ok:
                return p
        raise InputError(f"no optimization profile of this engine covers the shapes "
                         f"{ {k: tuple(v) for k, v in list(shapes.items())[:2]} }; it was built for batch <= "
                         f"{self.max_batch} and sequence <= {self.max_sequence}")

    def _run(self, input_ids, positions):
        torch = self.torch
        feeds = {INPUT_IDS: input_ids, ATTENTION_MASK: self._mask, POSITION_IDS: positions}
        for i in range(self.num_layers):
            feeds[past_key(i)] = self._past[2 * i]
            feeds[past_value(i)] = self._past[2 * i + 1]
        p = self._context_for({n: tuple(t.shape) for n, t in feeds.items()})
        ctx = self.contexts[p]
        for name, tensor in feeds.items():
            ctx.set_input_shape(name, tuple(tensor.shape))
            ctx.set_tensor_address(name, tensor.data_ptr() if tensor.numel() else self._dummy.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(ctx.get_tensor_shape(name))
            buf = torch.empty(shape, dtype=self._dtype(name), device="cuda")
            ctx.set_tensor_address(name, buf.data_ptr() if buf.numel() else self._dummy.data_ptr())
            outs[name] = buf
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        self.stream.synchronize()
        self._past = [outs[name] for name in present_names(self.num_layers)]
        return outs[LOGITS]

    # -- the Runner interface --
    @property
    def sequence_length(self) -> int:
        return 0 if self._mask is None else int(self._mask.shape[1])

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, *, last_only: bool = False) -> np.ndarray:
        torch = self.torch
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = input_ids.shape
        if seq > self.max_sequence:
            raise InputError(f"prompt is {seq} tokens; this engine allows at most {self.max_sequence}")
        if batch > self.max_batch:
            raise InputError(f"batch {batch} exceeds this engine's maximum batch of {self.max_batch}")
        mask = np.asarray(attention_mask, dtype=np.int64)
        empty = torch.empty((batch, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype, device="cuda")
        self._past = [empty] * (2 * self.num_layers)
        self._mask = torch.from_numpy(mask).cuda()
        self._positions = torch.from_numpy(positions_from_mask(mask)).cuda()
        logits = self._run(torch.from_numpy(input_ids).cuda(), self._positions)
        logits = logits[:, -1] if last_only else logits
        return logits.float().cpu().numpy()

    def decode(self, token_ids: np.ndarray) -> np.ndarray:
        torch = self.torch
        if self._mask is None:
            raise RuntimeError("decode before prefill")
        if self.sequence_length >= self.max_sequence:
            raise InputError(f"sequence reached this engine's limit of {self.max_sequence} tokens")
        batch = self._mask.shape[0]
        self._mask = torch.cat([self._mask, torch.ones((batch, 1), dtype=torch.int64, device="cuda")], dim=1)
        self._positions = self._positions[:, -1:] + 1
        ids = torch.from_numpy(np.asarray(token_ids, dtype=np.int64).reshape(batch, 1)).cuda()
        return self._run(ids, self._positions)[:, -1].float().cpu().numpy()

    def peak_device_memory_mb(self) -> float | None:
        return self.torch.cuda.max_memory_allocated() / (1 << 20)

    def release(self) -> None:
        self._past = []
        self._mask = self._positions = None
        self.contexts = []
        self.engine = None
        self.runtime = None
