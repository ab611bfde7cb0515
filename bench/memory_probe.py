"""Host-memory probes for large bundles (Linux; reads /proc/self/status). Not part of CI.

    .venv/bin/python bench/memory_probe.py session BUNDLE   # ONNX Runtime CPU session: anon vs file-backed RSS
    .venv/bin/python bench/memory_probe.py graphsurgeon BUNDLE OUT_DIR
        # the passes step's load path: onnx.load(external data) -> gs.import_onnx -> gs.export_onnx -> save

Each stage prints RSS split into anonymous memory (copies) and file-backed pages (memory-mapped
weights, which the kernel can drop and share), plus the process peak (VmHWM).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def mem() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = round(int(line.split()[1]) / 1024.0, 1)
    return out


def stage(name: str, t0: float, log: list) -> None:
    row = {"stage": name, "t_s": round(time.perf_counter() - t0, 1), **mem()}
    log.append(row)
    print(json.dumps(row), flush=True)


def session(bundle: Path) -> list:
    import numpy as np
    import onnxruntime as ort

    from leptonc.runtime.ort import session_options

    manifest = json.loads((bundle / "manifest.json").read_text())
    log: list = []
    t0 = time.perf_counter()
    stage("start", t0, log)
    sess = ort.InferenceSession(str(bundle / manifest["engine"]["file"]),
                                session_options(manifest["engine"].get("session", {})),
                                providers=["CPUExecutionProvider"])
    stage("session created", t0, log)
    io = manifest["engine"]["io"]
    feeds = {"input_ids": np.ones((1, 8), np.int64), "attention_mask": np.ones((1, 8), np.int64),
             "position_ids": np.arange(8, dtype=np.int64)[None]}
    if any(t["name"] == "logits_positions" for t in io["inputs"]):  # passes/select_logits.py
        feeds["logits_positions"] = np.arange(8, dtype=np.int64)[None]
    for t in io["inputs"]:
        if t["name"].startswith("past_key_values"):
            feeds[t["name"]] = np.zeros((1, io["num_kv_heads"], 0, io["head_dim"]), t["dtype"])
    sess.run(["logits"], feeds)
    stage("after one prefill", t0, log)
    return log


def graphsurgeon(bundle: Path, out_dir: Path) -> list:
    import onnx
    import onnx_graphsurgeon as gs

    log: list = []
    t0 = time.perf_counter()
    stage("start", t0, log)
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=True)
    stage("onnx.load(load_external_data=True)", t0, log)
    graph = gs.import_onnx(model)
    stage("gs.import_onnx", t0, log)
    del model
    stage("del model", t0, log)
    model = gs.export_onnx(graph.cleanup().toposort())
    stage("gs.export_onnx", t0, log)
    del graph
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out_dir / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    stage("onnx.save_model(external data)", t0, log)
    return log


if __name__ == "__main__":
    cmd, bundle = sys.argv[1], Path(sys.argv[2])
    result = session(bundle) if cmd == "session" else graphsurgeon(bundle, Path(sys.argv[3]))
    print(json.dumps({"probe": cmd, "bundle": str(bundle), "peak_mb": result[-1]["VmHWM"]}))
