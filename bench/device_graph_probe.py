"""HISTORICAL (sessions 2-4 in BENCHMARKS.md): superseded by the GPU length contract that GPU bundles
now carry (passes/fuse_attention.py, session 5); kept only to reproduce those figures.

EXPERIMENT (bench only): can ONNX Runtime capture smollm2's decode step in a CUDA graph, and how fast
is it then? Answers the question the compiler's bundles cannot yet (see BENCHMARKS.md, Runtime and GPU).

Input: a static-length copy of a fused bundle (bench/device_static_variant.py). This script writes a
decode-only copy of its graph specialised to batch B, one new token and a fixed [B, capacity] mask:
every Shape node of a graph input becomes a constant, so ONNX Runtime folds the scalar shape
arithmetic it would otherwise place on the CPU (which forbids graph capture). Prefill runs the
bundle's own graph in a second session; both sessions bind the same device KV buffers.

    python3 bench/device_graph_probe.py STATIC_BUNDLE OUT.json [batch] [capacity]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

PROMPT = "The capital of France is"
CPU_FP32_GREEDY = [7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34, 32, 33, 40, 29, 32, 33]


def specialise(src: Path, dst: Path, batch: int, capacity: int) -> int:
    model = onnx.load(str(src), load_external_data=False)
    g = model.graph
    shapes = {}
    for inp in g.input:
        dims = [d.dim_value if d.dim_value else None for d in inp.type.tensor_type.shape.dim]
        if inp.name in ("input_ids", "position_ids"):
            dims = [batch, 1]
        elif inp.name == "attention_mask":
            dims = [batch, capacity]
        elif inp.name.startswith("past_key_values."):
            dims = [batch, dims[1], capacity, dims[3]]
        shapes[inp.name] = dims
        for d, v in zip(inp.type.tensor_type.shape.dim, dims):
            d.ClearField("dim_param")
            d.dim_value = v
    replaced = 0
    for n in list(g.node):
        if n.op_type == "Shape" and n.input[0] in shapes:
            full = np.array(shapes[n.input[0]], np.int64)
            attrs = {a.name: a.i for a in n.attribute}
            start, end = attrs.get("start", 0), attrs.get("end", len(full))
            value = full[start:end]
            g.initializer.append(numpy_helper.from_array(value, n.output[0]))
            g.node.remove(n)
            replaced += 1
    onnx.save_model(model, str(dst))
    return replaced


def main() -> None:
    import onnxruntime as ort
    from transformers import AutoTokenizer

    bundle, out = Path(sys.argv[1]), Path(sys.argv[2])
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    capacity = int(sys.argv[4]) if len(sys.argv) > 4 else 512
    manifest = json.loads((bundle / "manifest.json").read_text())
    io = manifest["engine"]["io"]
    full_path = bundle / manifest["engine"]["file"]
    dec_path = bundle / f"decode_b{batch}.onnx"
    result = {"bundle": str(bundle), "batch": batch, "capacity": capacity,
              "shape_nodes_replaced": specialise(full_path, dec_path, batch, capacity)}
    ort.preload_dlls()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    prefill = ort.InferenceSession(str(full_path), so, providers=["CUDAExecutionProvider"])
    try:
        decode = ort.InferenceSession(str(dec_path), so, providers=[("CUDAExecutionProvider",
                                                                     {"enable_cuda_graph": "1"})])
        result["cuda_graph_session"] = "created"
    except Exception as exc:  # noqa: BLE001 - the answer to the question is the error
        result["cuda_graph_session"] = f"refused: {exc}"
        out.write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return

    L, H, D = io["num_layers"], io["num_kv_heads"], io["head_dim"]
    kv_dtype = np.float16 if io["kv_dtype"] == "float16" else np.float32
    kv = [ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, H, capacity, D), kv_dtype), "cuda", 0)
          for _ in range(2 * L)]
    names = [(f"past_key_values.{i}.{k}", f"present.{i}.{k}") for i in range(L) for k in ("key", "value")]
    tok = AutoTokenizer.from_pretrained(str(bundle / "tokenizer"))
    prompt = np.array([tok(PROMPT)["input_ids"]] * batch, np.int64)
    vocab = io["vocab_size"]

    ids_v = ort.OrtValue.ortvalue_from_shape_and_type([batch, 1], np.int64, "cuda", 0)
    pos_v = ort.OrtValue.ortvalue_from_shape_and_type([batch, 1], np.int64, "cuda", 0)
    mask_v = ort.OrtValue.ortvalue_from_shape_and_type([batch, capacity], np.int64, "cuda", 0)
    logits_v = ort.OrtValue.ortvalue_from_shape_and_type([batch, 1, vocab], np.float32, "cuda", 0)
    db = decode.io_binding()
    db.bind_ortvalue_input("input_ids", ids_v)
    db.bind_ortvalue_input("position_ids", pos_v)
    db.bind_ortvalue_input("attention_mask", mask_v)
    for j, (p, q) in enumerate(names):
        db.bind_ortvalue_input(p, kv[j])
        db.bind_ortvalue_output(q, kv[j])
    db.bind_ortvalue_output("logits", logits_v)
    ro = ort.RunOptions()
    ro.add_run_config_entry("gpu_graph_id", "1")

    def generate(n_new: int) -> tuple[list[int], list[float], float]:
        plen = prompt.shape[1]
        pb = prefill.io_binding()
        pb.bind_cpu_input("input_ids", prompt)
        pb.bind_cpu_input("attention_mask", np.ones_like(prompt))
        pb.bind_cpu_input("position_ids", np.tile(np.arange(plen, dtype=np.int64), (batch, 1)))
        pb.bind_output("logits", "cuda", 0)  # first: get_outputs() keeps binding order
        for j, (p, q) in enumerate(names):
            pb.bind_ortvalue_input(p, kv[j])
            pb.bind_ortvalue_output(q, kv[j])
        t0 = time.perf_counter()
        prefill.run_with_iobinding(pb)
        last = pb.get_outputs()[0].numpy()[:, -1]
        ttft = time.perf_counter() - t0
        out_ids, steps = [], []
        mask = np.zeros((batch, capacity), np.int64)
        mask[:, :plen] = 1
        length = plen
        token = last.argmax(-1)
        for _ in range(n_new):
            out_ids.append(int(token[0]))
            s = time.perf_counter()
            mask[:, length] = 1
            ids_v.update_inplace(token.reshape(batch, 1).astype(np.int64))
            pos_v.update_inplace(np.full((batch, 1), length, np.int64))
            mask_v.update_inplace(mask)
            decode.run_with_iobinding(db, ro)
            logits = logits_v.numpy()[:, 0]
            steps.append(time.perf_counter() - s)
            token = logits.argmax(-1)
            length += 1
        return out_ids, steps, ttft

    generate(8)  # warm-up: ORT runs a graph id normally a few times, then captures it
    generate(8)
    ids16, _, _ = generate(16)
    rates = []
    for _ in range(5):
        _, steps, ttft = generate(128)
        rates.append(batch * len(steps) / sum(steps))
    result.update({"greedy_16": ids16, "matches_smollm2_cpu_fp32": ids16 == CPU_FP32_GREEDY,
                   "decode_tokens_per_s_median": round(float(np.median(rates)), 1),
                   "decode_tokens_per_s_all": [round(r, 1) for r in rates],
                   "step_ms_p50": round(1000 * float(np.median(steps)), 4)})
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
