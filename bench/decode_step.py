"""One decode step of a bundle's ONNX model over a random KV cache of PAST tokens (no prefill),
timed with ONNX Runtime's default optimizations; with `prof`, ONNX Runtime's profiler summarizes
kernel time per operator type.

    .venv/bin/python bench/decode_step.py BUNDLE/model.onnx 1024 [prof]
"""

from __future__ import annotations

import collections
import json
import sys
import time

import numpy as np


def main(path: str, past: int, prof: bool) -> None:
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if prof:
        so.enable_profiling = True
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    f = {"input_ids": np.array([[5]]), "attention_mask": np.ones((1, past + 1), np.int64),
         "position_ids": np.array([[past]])}
    for i in onnx.load(path, load_external_data=False).graph.input:
        if i.name.startswith("past_key_values"):
            dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
            f[i.name] = rng.standard_normal((1, dims[1], past, dims[3])).astype(np.float32)
        elif i.name == "logits_positions":  # passes/select_logits.py: the one new position
            f[i.name] = np.array([[0]])
    s.run(None, f)
    ts = []
    for _ in range(6):
        t = time.perf_counter()
        s.run(None, f)
        ts.append(time.perf_counter() - t)
    print(f"{path} past {past}: median {1000 * np.median(ts):.1f} ms, min {1000 * min(ts):.1f} ms")
    if prof:
        agg, runs = collections.Counter(), 0
        for e in json.load(open(s.end_profiling())):
            runs += e.get("cat") == "Session" and e["name"] == "model_run"
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                agg[e["args"]["op_name"]] += e["dur"]
        print(f"kernel ms per run: total {sum(agg.values()) / 1000 / runs:.1f}; " +
              ", ".join(f"{k} {v / 1000 / runs:.1f}" for k, v in agg.most_common(8)))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), len(sys.argv) > 3 and sys.argv[3] == "prof")
