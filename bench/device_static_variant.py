"""HISTORICAL (sessions 2-4 in BENCHMARKS.md): superseded by the GPU length contract that GPU bundles
now carry (passes/fuse_attention.py, session 5); kept only to reproduce those figures.

EXPERIMENT (bench only, not a compiler pass): a static-length copy of a fused onnxruntime bundle, to
measure what CUDA graphs would bring to decode.

passes/fuse_attention.py derives GroupQueryAttention's `seqlens_k` from the attention mask's *length*
(T - 1 for every row), which keeps left-padded batches right but makes every decode step a new shape,
so ONNX Runtime cannot replay a captured CUDA graph. This script copies a bundle and rewires
`seqlens_k` to the mask's *contents* (ReduceSum(mask) - 1), the contract ONNX Runtime GenAI uses. The
runner then binds a fixed [batch, capacity] mask and turns on `enable_cuda_graph` (engine setting
"gqa_lengths": "mask_sum"). Correct for rows without left padding only (what bench runs); the copy's
manifest says so and is not hash-valid (load it with --no-verify).

    python3 bench/device_static_variant.py BUNDLE OUT_BUNDLE [--compat-only]

Both forms also drop GroupQueryAttention's 17th input for ONNX Runtime 1.31 (see _trim_gqa_inputs);
--compat-only does only that.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _trim_gqa_inputs(gqa: list) -> int:
    """ONNX Runtime 1.31 (the CUDA 13 build on the lent H100) accepts at most 16 GroupQueryAttention inputs;
    1.32 added the 17th, `query_seqlens`, which passes/fuse_attention.py fills for the CPU kernel's
    chunked prefill. The CUDA kernel does not need it (it takes S for every row): drop it when it is there."""
    trimmed = 0
    for n in gqa:
        if len(n.input) > 16:
            del n.input[16:]
            trimmed += 1
        while n.input and n.input[-1] == "":
            del n.input[-1]
    return trimmed


def make_compat(src: Path, dst: Path) -> dict:
    """Only the ORT 1.31 trim, no contract change: the compiler's own graph, loadable on the device."""
    return make_static(src, dst, static=False)


def make_static(src: Path, dst: Path, static: bool = True) -> dict:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.onnx.data"))
    try:  # a hard link (bundles refuse symlinked external data); a copy across file systems
        os.link(src / "model.onnx.data", dst / "model.onnx.data")
    except OSError:
        shutil.copy2(src / "model.onnx.data", dst / "model.onnx.data")
    manifest = json.loads((src / "manifest.json").read_text())
    model = onnx.load(str(src / manifest["engine"]["file"]), load_external_data=False)
    g = model.graph
    gqa = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    if not gqa:
        raise SystemExit(f"{src} has no GroupQueryAttention: nothing to make static")
    trimmed = _trim_gqa_inputs(gqa)
    if not static:
        producer = []
        onnx.save_model(model, str(dst / manifest["engine"]["file"]))
        manifest["experimental"] = "bench/device_static_variant.py: GQA query_seqlens input dropped for ORT 1.31"
        (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
        return {"gqa_nodes": len(gqa), "trimmed_query_seqlens": trimmed}
    old = gqa[0].input[5]
    g.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "static/axes1"))
    g.initializer.append(numpy_helper.from_array(np.array(1, np.int64), "static/one"))
    new_nodes = [
        helper.make_node("ReduceSum", ["attention_mask", "static/axes1"], ["static/len64"], keepdims=0,
                         name="static/len"),
        helper.make_node("Sub", ["static/len64", "static/one"], ["static/last64"], name="static/last"),
        helper.make_node("Cast", ["static/last64"], ["static/seqlens_k"], to=onnx.TensorProto.INT32,
                         name="static/seqlens_k"),
    ]
    for n in gqa:
        if n.input[5] != old:
            raise SystemExit("GQA nodes disagree on seqlens_k; unexpected graph")
        n.input[5] = "static/seqlens_k"
    producer = [n for n in g.node if old in n.output]
    for n in producer:
        g.node.remove(n)
    for i, n in enumerate(new_nodes):
        g.node.insert(i, n)
    onnx.save_model(model, str(dst / manifest["engine"]["file"]))
    manifest["engine"]["session"]["gqa_lengths"] = "mask_sum"
    manifest["experimental"] = ("bench/device_static_variant.py: seqlens_k from ReduceSum(attention_mask); "
                                "right for unpadded rows only; hashes not updated")
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return {"gqa_nodes": len(gqa), "removed": [n.op_type for n in producer], "trimmed_query_seqlens": trimmed}


if __name__ == "__main__":
    compat = "--compat-only" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--compat-only"]
    print(json.dumps((make_compat if compat else make_static)(Path(args[0]), Path(args[1]))))
