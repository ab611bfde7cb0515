"""ONNX Runtime CUDA runner: the KV cache lives on the GPU between steps.

Every input and output goes through ORT I/O binding to OrtValues on the device; the host sends only
the new token ids (and mask/positions) and reads back only the logits. Two cache layouts:

- **growing** (graphs without a cache-owning attention, the plain export's `Concat` attention): each step binds
  `past_key_values.*` to the previous step's `present.*` OrtValues, which ORT allocated on the GPU. Nothing crosses
  to the host.
- **shared** (graphs with `GroupQueryAttention` or leptonc's `CachedAttention`): one zeroed device block per batch
  size holds every layer's K and V, [2 x layers, batch, kv_heads, capacity, head_dim]; each layer's slice is bound
  by address as both past and present, so the attention writes the new entries in place (ORT's
  past_present_share_buffer): no per-step allocation, fixed addresses (leptonc/runtime/kv_block.py); the decode
  binding is made once per batch size (leptonc/runtime/fixed_decode.py).
- **prefill in row chunks**: a prompt batch runs through the graph at most `prefill_tokens` tokens at a
  time (engine setting, default 4,096), whole rows per chunk, each chunk bound to its rows of the K/V block, so a
  large batch of long prompts does not hold all of its activations at once. A single row is never split. Smaller
  chunks cost time to first token: on the H100, a 16 x 128 prefill of llama-1b-shape in 512-token chunks took
  21.2 ms against 12.1 ms in one run (BENCHMARKS.md), hence the default.
- **CUDA graphs** (`enable_cuda_graph`, one captured graph per batch size, prefill uncaptured via
  `gpu_graph_id` -1) additionally need fixed *shapes*. GPU bundles are built for that (engine setting
  "gqa_lengths": "mask_sum", passes/fuse_attention.py): GroupQueryAttention reads each row's length
  from the mask's contents, so this runner right-pads prompts (real tokens first, per-row positions
  0..len-1) and decodes against a fixed [B, capacity] mask whose first `len` entries are 1. Callers
  still pass left-padded batches and get logits in their own layout back. Graphs fused for the CPU
  ("mask_length": lengths from the mask's length, padding masked by a bias) keep left padding and a
  mask that grows each step, so they cannot be captured; `describe()` says why.
- **pipelined greedy decode** and the session's provider setup (its own stream, the cuBLAS workspace, device
  memory): leptonc/runtime/fixed_decode.py and leptonc/runtime/ort_cuda_session.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from leptonc.errors import InputError
from leptonc.graph_contract import ATTENTION_MASK, INPUT_IDS, KV_KINDS, LOGITS, LOGITS_POSITIONS, NEXT_TOKEN, \
    POSITION_IDS, past_name, present_name
from leptonc.runtime.base import positions_from_mask
from leptonc.runtime.fixed_decode import PIPELINE_DEPTH, FixedAddressDecode
from leptonc.runtime.kv_block import KvBlock
from leptonc.runtime.engine_settings import EngineSettings
from leptonc.runtime.ort_cuda_session import (GpuMemory, cublas_workspace_env, graph_facts,
                                              load_ort_cuda, open_session, restore_cublas_env, set_kernel_buffer_sizes)

CACHE_ATTENTION_OPS = frozenset({"GroupQueryAttention", "CachedAttention"})  # attention that owns a K/V cache
_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": None}


class OrtCudaRunner(FixedAddressDecode):
    device = "cuda"

    def __init__(self, model_path: Path, io: dict, settings: dict | None = None, *, max_sequence: int = 2048,
                 max_batch: int = 64, device_id: int = 0, cuda_graph: bool | None = None, device_type: str = "cuda",
                 run_settings: EngineSettings | None = None):
        # device_type "cpu" runs this same I/O-binding code on ONNX Runtime's CPU provider: that is how the
        # CPU-only CI checks its cache handling; speed claims come from "cuda" on the device only.
        if device_type not in ("cuda", "cpu"):
            raise ValueError(f"device_type must be 'cuda' or 'cpu', not {device_type!r}")
        self.device_type = device_type
        self.device = device_type
        if device_type == "cuda":
            ort = load_ort_cuda()
        else:
            import onnxruntime as ort
        self.ort = ort
        settings = dict(settings or {})
        self.io = io
        self.device_id = device_id
        self.num_layers = io["num_layers"]
        self.kv_heads, self.head_dim = io["num_kv_heads"], io["head_dim"]
        self.kv_dtype = np.dtype(_DTYPES.get(io["kv_dtype"], io["kv_dtype"]) or np.float16)
        self.vocab_size = io["vocab_size"]
        self.max_sequence, self.max_batch = max_sequence, max_batch
        self.memory = GpuMemory(device_id) if device_type == "cuda" else None
        self.run_settings = run_settings or EngineSettings()
        self.prefill_tokens = self.run_settings.prefill_tokens
        if cuda_graph is None:
            cuda_graph = self.run_settings.cuda_graph

        ops, self.unread_inputs = graph_facts(model_path)  # unread inputs are bound on the host (graph_facts)
        # ai.leptonc.CachedAttention (passes/use_kernels.py) keeps GroupQueryAttention's contract: shared past/present
        # buffer, lengths from the mask's contents.
        self.shared_kv = bool(ops & CACHE_ATTENTION_OPS)
        # "mask_sum" graphs take right-padded prompts and a fixed [B, capacity] decode mask (module doc).
        self.right_pad = self.shared_kv and settings.get("gqa_lengths") == "mask_sum"
        self.cuda_graph = bool(cuda_graph) and self.right_pad and device_type == "cuda"
        if self.cuda_graph:
            self.cuda_graph_reason = "on"
        elif not self.shared_kv:
            self.cuda_graph_reason = "off: the graph has no GroupQueryAttention, so the cache grows each step"
        elif not self.right_pad:
            self.cuda_graph_reason = ("off: this graph derives attention lengths from the mask's length "
                                      "(a CPU-target graph), so decode shapes change every step")
        elif device_type != "cuda":
            self.cuda_graph_reason = "off: CPU provider"
        else:
            self.cuda_graph_reason = "off: the cuda_graph engine setting is false"

        from leptonc.runtime.ort import session_options

        library = settings.get("custom_ops_library")
        if library and device_type != "cuda":
            raise InputError(f"this bundle runs leptonc's CUDA kernels ({library}), which need "
                             "ONNX Runtime's CUDA provider", hint="run it on a machine with an NVIDIA GPU and "
                             "onnxruntime-gpu, or compile with --disable-pass use_leptonc_kernels")
        so = session_options(settings, Path(model_path).parent)
        if self.run_settings.profile_prefix:  # per-node timings and placement
            so.enable_profiling = True
            so.profile_file_prefix = self.run_settings.profile_prefix
        self.cublas_workspace = cublas_workspace_env() if device_type == "cuda" else None
        opened = open_session(ort, model_path, so, device_type=device_type, device_id=device_id,
                              cuda_graph=self.cuda_graph)
        self.session, self._providers = opened.session, opened.helper_providers
        self._driver, self._stream, self._pipeline_reason = opened.driver, opened.stream, opened.pipeline_reason
        self.pipelined = False
        if opened.cuda_graph_refusal:
            self.cuda_graph, self.cuda_graph_reason = False, opened.cuda_graph_refusal
        self.kernel_launch = None
        if library:  # the library is loaded with the session: its buffer sizes are set before its first step
            set_kernel_buffer_sizes(Path(model_path).parent / library, self.run_settings)
            self.kernel_launch = (
                "programmatic dependent launch on sm_90 and later; shared buffers "
                f"{self.run_settings.kernel_buffer_mb} MiB each, cuBLAS workspace "
                f"{self.run_settings.kernel_cublas_workspace_mb} MiB (process-wide, as the first step allocates them)")
        self.input_names = {i.name for i in self.session.get_inputs()}
        # passes/select_logits.py: the LM head runs only on the positions bound here.
        self.selects_logits = LOGITS_POSITIONS in self.input_names
        self.output_names = [o.name for o in self.session.get_outputs()]
        # passes/greedy_token.py: the graph's argmax of the logits, so greedy steps copy B tokens, not B x vocab.
        # The output is always bound where it exists (a captured step must not write to memory it does not own).
        self.token_output = NEXT_TOKEN in self.output_names
        self.greedy_output = self.token_output
        self.logits_dtype = np.float16 if self.session.get_outputs()[0].type == "tensor(float16)" else np.float32
        if self._driver is not None and not (self.cuda_graph and self.greedy_output):
            self._pipeline_reason = ("off: the graph has no next_token output, so the "
                                     "host must see each step's logits" if self.cuda_graph else
                                     "off: ONNX Runtime refused to capture the decode step")
        elif self._driver is not None:
            self.pipelined = True
            self._pipeline_reason = (f"on: up to {PIPELINE_DEPTH} steps queued ahead of the token the host reads; "
                                     "each step's ids are the step before's next_token, copied on the device")
        self._batch = 0
        self._mask: np.ndarray | None = None  # left-padded layout: the mask so far
        self._positions: np.ndarray | None = None
        self._lengths: np.ndarray | None = None  # right-padded layout: real tokens per row
        self._total = 0  # tokens held per row, padding included
        self._kv: list = []  # OrtValues on the device
        self._static: dict = {}  # per batch size: fixed-address decode inputs/outputs (shared layout)
        self._graph_ids: dict[int, int] = {}
        self._feeds: list = []  # inputs bound for the run in progress
        self._gather = None  # the last-position slicer, made on first use
        self._zeros = None  # the K/V block allocator, made on first use
        self._sample_memory()

    # ---- helpers ----------------------------------------------------------------------------------

    def _ortvalue(self, array: np.ndarray):
        value = self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device_type, self.device_id)
        # A binding keeps only the C++ value: on the CPU provider that wraps the numpy buffer, so the Python
        # wrapper (which owns that buffer) must live until the run is over.
        self._feeds.append(value)
        return value

    def _bind(self, binding, name: str, array: np.ndarray) -> None:
        """Bind a host array as input `name`: copied to the device, or (an input no node reads: graph_facts) left on
        the host, where ONNX Runtime copies nothing and so waits for nothing queued on the stream."""
        if name in self.unread_inputs:
            array = np.ascontiguousarray(array)
            self._feeds.append(array)  # the binding refers to it until the run is over
            binding.bind_cpu_input(name, array)
        else:
            binding.bind_ortvalue_input(name, self._ortvalue(array))

    def _empty(self, shape, dtype):
        return self.ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.device_type, self.device_id)

    def _kv_names(self):
        for i in range(self.num_layers):
            for kind in KV_KINDS:
                yield past_name(i, kind), present_name(i, kind)

    def describe(self) -> dict:
        return {"runner": type(self).__name__, "provider": self.session.get_providers()[0] if self.session else None,
                "kv_layout": "shared" if self.shared_kv else "growing",
                "padding": "right (fixed-shape decode mask)" if self.right_pad else "left",
                **({"prefill_tokens": self.prefill_tokens} if self.shared_kv else {}),
                "cuda_graph": self.cuda_graph_reason,
                "greedy_pipeline": self._pipeline_reason,
                **({"leptonc_kernels": self.kernel_launch} if self.kernel_launch else {}),
                **({"cublas_workspace_config": self.cublas_workspace} if self.cublas_workspace else {}),
                "greedy_tokens": ("argmax in the graph (next_token output)" if self.greedy_output else
                                  "argmax of the logits on the host"),
                "engine_settings": self.run_settings.as_dict()}

    def _sample_memory(self) -> None:
        if self.memory is not None:
            self.memory.sample()

    def device_name(self) -> str:
        if self.memory is None:
            return "cpu (I/O-binding runner)"
        name = self.memory.name()
        return f"cuda:{self.device_id} {name}" if name else f"cuda:{self.device_id}"

    @property
    def sequence_length(self) -> int:
        return self._total

    @property
    def capacity(self) -> int:
        return self.max_sequence

    # ---- prefill ----------------------------------------------------------------------------------

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, *, last_only: bool = False) -> np.ndarray:
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = input_ids.shape
        if seq > self.max_sequence:
            raise InputError(f"prompt is {seq} tokens; this bundle allows at most {self.max_sequence}")
        if batch > self.max_batch:
            raise InputError(f"batch of {batch} exceeds this bundle's maximum batch of {self.max_batch}")
        self._batch = batch
        self._feeds = []
        mask = np.asarray(attention_mask, dtype=np.int64)
        order = None
        if self.right_pad:
            # Real tokens first in each row (stable, so their order is kept); positions 0..S-1.
            self._lengths = mask.sum(axis=1).astype(np.int64)
            order = np.argsort(mask == 0, axis=1, kind="stable")
            input_ids = np.take_along_axis(input_ids, order, axis=1)
            mask = (np.arange(seq)[None, :] < self._lengths[:, None]).astype(np.int64)
            positions = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq))
            last = self._lengths - 1
        else:
            self._mask = mask
            positions = self._positions = positions_from_mask(mask)
            last = np.full(batch, seq - 1, np.int64)
        self._total = seq
        select = None
        if self.selects_logits:  # only the last position, or every one (callers index the full form)
            select = last.reshape(-1, 1) if last_only else np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq))
        block = self._kv_block(batch) if self.shared_kv else None
        rows = max(1, self.prefill_tokens // seq) if block is not None else batch
        parts = [self._prefill_rows(r0, min(batch, r0 + rows), input_ids, mask, positions, select, last, last_only,
                                    block) for r0 in range(0, batch, rows)]
        logits = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        if self.right_pad:
            self._reset_decode_mask(batch)
        if not last_only and order is not None:  # back to the caller's (left-padded) layout
            restored = np.zeros_like(logits)
            np.put_along_axis(restored, order[:, :, None], logits, axis=1)
            logits = restored
        self._sample_memory()
        return logits.astype(np.float32, copy=False)

    def _prefill_rows(self, r0: int, r1: int, input_ids, mask, positions, select, last, last_only: bool,
                      block: "KvBlock | None") -> np.ndarray:
        """One prefill run over rows r0:r1 (their slice of the K/V block); their logits on the host."""
        binding = self.session.io_binding()
        for name, array in ((INPUT_IDS, input_ids), (ATTENTION_MASK, mask), (POSITION_IDS, positions),
                            (LOGITS_POSITIONS, select)):
            if array is not None:
                self._bind(binding, name, array[r0:r1])
        binding.bind_output(LOGITS, self.device_type, self.device_id)  # bound first: get_outputs() keeps binding order
        if block is not None:
            block.bind(binding, (r0, r1))
        else:
            empty = np.zeros((r1 - r0, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
            for past, present in self._kv_names():
                binding.bind_ortvalue_input(past, self._ortvalue(empty))
                binding.bind_output(present, self.device_type, self.device_id)
        self.session.run_with_iobinding(binding, self._run_options(-1))
        outputs = binding.get_outputs()
        if block is None:
            self._kv = list(outputs[1:])
        if last_only and select is not None:  # the graph computed [rows, 1, vocab] only
            return outputs[0].numpy().reshape(r1 - r0, -1)
        if last_only:  # slice on the device: the host gets [rows, vocab], not [rows, S, vocab]
            return self._last_position(outputs[0], last[r0:r1])
        return outputs[0].numpy()

    def _last_position(self, logits_value, last: np.ndarray) -> np.ndarray:
        """logits[b, last[b]] of a device OrtValue, through a one-node GatherND session on the same
        provider, so a prefill copies B x vocab to the host instead of B x S x vocab (0.5 GB for 1,024
        tokens of a 128k vocabulary in fp32)."""
        if self._gather is None:
            from onnx import TensorProto, helper

            elem = TensorProto.FLOAT16 if self.logits_dtype == np.float16 else TensorProto.FLOAT
            self._gather = self._helper_session(
                helper.make_node("GatherND", ["logits", "last"], ["out"], batch_dims=1), "last_position",
                [helper.make_tensor_value_info("logits", elem, ["batch", "sequence", "vocab"]),
                 helper.make_tensor_value_info("last", TensorProto.INT64, ["batch", 1])],
                [helper.make_tensor_value_info("out", elem, ["batch", "vocab"])])
        binding = self._gather.io_binding()
        binding.bind_ortvalue_input("logits", logits_value)
        binding.bind_ortvalue_input("last", self._ortvalue(np.asarray(last, np.int64).reshape(-1, 1)))
        binding.bind_output("out", self.device_type, self.device_id)
        self._gather.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def _zeros_session(self):
        """A one-node session (ConstantOfShape, zeros of the cache dtype) on this runner's provider."""
        if self._zeros is None:
            from onnx import TensorProto, helper, numpy_helper

            self._zeros = self._helper_session(
                helper.make_node("ConstantOfShape", ["shape"], ["zeros"],
                                 value=numpy_helper.from_array(np.zeros(1, self.kv_dtype))), "kv_zeros",
                [helper.make_tensor_value_info("shape", TensorProto.INT64, [5])],
                [helper.make_tensor_value_info("zeros", helper.np_dtype_to_tensor_dtype(self.kv_dtype), None)])
        return self._zeros

    def _helper_session(self, node, name: str, inputs: list, outputs: list):
        """A one-node session on this runner's provider and options, without graph capture. Its log is
        quiet: a failure (an allocation that does not fit) reaches the caller as an exception, which
        the caller turns into a message."""
        from onnx import helper

        model = helper.make_model(helper.make_graph([node], name, inputs, outputs),
                                  opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        so = self.ort.SessionOptions()
        so.log_severity_level = 4
        return self.ort.InferenceSession(model.SerializeToString(), so, providers=self._providers)

    def _kv_block(self, batch: int) -> KvBlock:
        """The batch size's K/V block at full capacity; reused (never reallocated) across sequences."""
        static = self._static.get(batch)
        if static is None:
            static = self._static[batch] = {"kv": KvBlock(self, batch)}
        return static["kv"]

    def _run_options(self, graph_id: int):
        ro = self.ort.RunOptions()
        if self.cuda_graph:
            ro.add_run_config_entry("gpu_graph_id", str(graph_id))
        return ro

    # ---- decode -----------------------------------------------------------------------------------

    def decode(self, token_ids: np.ndarray) -> np.ndarray:
        logits = self._decode(token_ids)[LOGITS].numpy()
        return logits.reshape(self._batch, -1).astype(np.float32, copy=False)

    def decode_tokens(self, token_ids: np.ndarray) -> np.ndarray:
        """The greedy next token per row. With the graph's `next_token` output, only the B tokens are
        copied to the host: the logits stay on the device (bound, but not read)."""
        if not self.greedy_output:
            return super().decode_tokens(token_ids)
        # a copy: on the CPU provider numpy() is a view of the bound buffer, which the next step overwrites
        return self._decode(token_ids)[NEXT_TOKEN].numpy().reshape(self._batch).copy()

    def _decode(self, token_ids: np.ndarray) -> dict:
        """One decode step; its outputs as device values by name (logits, and next_token where the graph has it)."""
        if self._total == 0:
            raise RuntimeError("decode before prefill")
        if self._total >= self.max_sequence:
            raise InputError(f"sequence reached this bundle's limit of {self.max_sequence} tokens")
        batch = self._batch
        ids = np.asarray(token_ids, dtype=np.int64).reshape(batch, 1)
        self._total += 1
        if self.right_pad:
            return self._decode_shared(ids)
        self._mask = np.concatenate([self._mask, np.ones((batch, 1), np.int64)], axis=1)
        self._positions = self._positions[:, -1:] + 1
        return self._decode_shared(ids) if self.shared_kv else self._decode_bound(ids)

    def _decode_bound(self, ids: np.ndarray) -> dict:
        """One step of the growing layout: past <- the last step's present, both on the device."""
        self._feeds = []
        binding = self.session.io_binding()
        self._bind(binding, INPUT_IDS, ids)
        self._bind(binding, ATTENTION_MASK, self._mask)
        self._bind(binding, POSITION_IDS, self._positions)
        if self.selects_logits:
            self._bind(binding, LOGITS_POSITIONS, np.zeros((self._batch, 1), np.int64))
        binding.bind_output(LOGITS, self.device_type, self.device_id)  # first: get_outputs() keeps binding order
        for j, (past, present) in enumerate(self._kv_names()):
            binding.bind_ortvalue_input(past, self._kv[j])
            binding.bind_output(present, self.device_type, self.device_id)
        if self.token_output:  # last, after the cache
            binding.bind_output(NEXT_TOKEN, self.device_type, self.device_id)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        self._kv = list(outputs[1:1 + 2 * self.num_layers])
        return {LOGITS: outputs[0], **({NEXT_TOKEN: outputs[-1]} if self.token_output else {})}

    # ---- teardown ---------------------------------------------------------------------------------

    def peak_device_memory_mb(self) -> float | None:
        if self.memory is None or self.memory.handle is None:
            return None
        self.memory.sample()
        return round(self.memory.peak, 1)

    def release(self) -> None:
        if self._stream is not None:
            self._driver.sync(self._stream)
        for static in self._static.values():
            for slot in static.get("pipeline", {}).get("slots", []):
                self._driver.free_pinned(slot["inputs"])
                self._driver.free_pinned(slot["tokens"])
                self._driver.destroy_event(slot["event"])
        self._kv = []
        self._static = {}
        self._gather = None
        self._zeros = None
        self.session = None
        self._release_stream()
        if self.cublas_workspace:  # the next cuBLAS handles in this process (PyTorch's, say) get the user's setting
            restore_cublas_env()
