"""ai.leptonc.CachedAttention on the GPU, before any bundle uses it (passes/use_kernels.py keeps it off unless
LEPTONC_ATTENTION_KERNEL=1). Two checks, one JSON file:

1. `kernels`: bench/attention_check.cu, the kernels alone against a CPU reference in double precision, with
   timings (decode at several splits, prefill).
2. `op`: the custom op as the pass writes it (one node, lowered from a GroupQueryAttention by the pass itself)
   against ONNX Runtime's GroupQueryAttention on the CUDA provider and the numpy contract
   (targets/kernels/attention_reference.py): a right-padded first prompt, then decode steps, with past and present
   bound to one device buffer as the runner binds them; then one call with present left to ONNX Runtime (the op
   copies the past into it).

    LEPTONC_ORT_INCLUDE=$PWD/.ort-include python3 bench/device_attention_check.py OUT.json

Exit status 1 when a comparison is outside its tolerance; the JSON says which.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_kernels(tmp: Path) -> dict:
    from leptonc.targets import kernels

    nvcc = kernels.find_nvcc()
    if nvcc is None:
        return {"error": "nvcc not found"}
    exe, out = tmp / "attention_check", tmp / "attention_check.json"
    cmd = [str(nvcc), "-O3", "-std=c++17", "-arch=sm_90", str(ROOT / "bench" / "attention_check.cu"), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if build.returncode != 0:
        return {"error": "nvcc failed", "stderr": build.stderr[-3000:]}
    proc = subprocess.run([str(exe), str(out)], capture_output=True, text=True, timeout=300)
    result = json.loads(out.read_text()) if out.is_file() else {}
    result.update({"rc": proc.returncode, "log": proc.stderr[-4000:]})
    return result


def _graphs(h: int, kvh: int, d: int, cos: np.ndarray, sin: np.ndarray):
    """(GroupQueryAttention model, CachedAttention model) of one node each, the second made by the pass."""
    import onnx_graphsurgeon as gs

    from leptonc.passes import PassContext
    from leptonc.passes.use_kernels import use_leptonc_kernels
    from leptonc.targets.kernels.attention_reference import gqa_graph

    lowered = gqa_graph(h, kvh, d, cos, sin)
    result = use_leptonc_kernels(lowered, PassContext(backend="onnxruntime", precision="fp16", options={
        "cuda_kernels": {"file": "libleptonc_cuda.so", "arch": "sm_90"}, "attention_kernel": True}))
    if not result.applied or lowered.nodes[0].op != "CachedAttention":
        raise SystemExit(f"the pass did not lower the node: {result.detail}")
    models = gs.export_onnx(gqa_graph(h, kvh, d, cos, sin)), gs.export_onnx(lowered)
    for model in models:  # as leptonc/export.py writes it: the device's onnx may default to an IR ORT cannot read
        model.ir_version = 8
    return models


def run_op() -> dict:
    from leptonc.runtime.ort_cuda import load_ort_cuda
    from leptonc.targets import kernels
    from leptonc.targets.kernels.attention_reference import cached_attention

    ort = load_ort_cuda()
    lib = kernels.build_library((9, 0))  # the default cache: the compiles after this check reuse the build
    rng = np.random.default_rng(7)
    report: dict = {"cases": []}
    for h, kvh, d in ((32, 8, 64), (9, 3, 64), (32, 8, 128)):
        positions, cap, b, s = 2048, 320, 2, 40
        inv = 500000.0 ** (-np.arange(0, d, 2) / d)
        ang = np.arange(positions)[:, None] * inv[None, :]
        cos, sin = np.cos(ang).astype(np.float16), np.sin(ang).astype(np.float16)
        gqa_model, ours_model = _graphs(h, kvh, d, cos, sin)
        so = ort.SessionOptions()
        so.register_custom_ops_library(str(lib.path))
        providers = [("CUDAExecutionProvider", {"device_id": "0"})]
        sessions = {"ort_gqa": ort.InferenceSession(gqa_model.SerializeToString(), providers=providers),
                    "leptonc": ort.InferenceSession(ours_model.SerializeToString(), so, providers=providers)}
        caches = {name: [ort.OrtValue.ortvalue_from_numpy(np.zeros((b, kvh, cap, d), np.float16), "cuda", 0)
                         for _ in range(2)] for name in sessions}
        ref_k = np.zeros((b, kvh, cap, d))
        ref_v = np.zeros_like(ref_k)
        lengths = np.array([s, 23])
        steps = [(rng.standard_normal((b, s, (h + 2 * kvh) * d)).astype(np.float16), lengths - 1, s)]
        steps += [(rng.standard_normal((b, 1, (h + 2 * kvh) * d)).astype(np.float16), lengths + i, cap) for i in range(5)]
        for i, (qkv, seqlens, total) in enumerate(steps):
            outs = {}
            for name, sess in sessions.items():
                bind = sess.io_binding()
                bind.bind_ortvalue_input("qkv", ort.OrtValue.ortvalue_from_numpy(qkv, "cuda", 0))
                bind.bind_output("attn", "cuda", 0)  # first: get_outputs() follows the binding order
                for kind, value in zip(("key", "value"), caches[name]):  # past and present: one buffer
                    shape, ptr = [b, kvh, cap, d], value.data_ptr()
                    bind.bind_input(f"past_key_values.0.{kind}", "cuda", 0, np.float16, shape, ptr)
                    bind.bind_output(f"present.0.{kind}", "cuda", 0, np.float16, shape, ptr)
                bind.bind_ortvalue_input("gqa/seqlens_k",
                                         ort.OrtValue.ortvalue_from_numpy(seqlens.astype(np.int32), "cuda", 0))
                bind.bind_cpu_input("gqa/total_sequence_length", np.array(total, np.int32))
                sess.run_with_iobinding(bind)
                outs[name] = bind.get_outputs()[0].numpy().astype(np.float64)
            ref_out, ref_k, ref_v = cached_attention(qkv, ref_k, ref_v, seqlens, total, cos, sin, num_heads=h,
                                                     kv_num_heads=kvh)
            k_ours, v_ours = (c.numpy().astype(np.float64) for c in caches["leptonc"])
            k_ort, v_ort = (c.numpy().astype(np.float64) for c in caches["ort_gqa"])
            case = {"heads": [h, kvh, d], "step": "prefill" if i == 0 else f"decode {i}", "rows": []}
            for row in range(b):
                real = int(lengths[row]) if i == 0 else 1
                end = int(seqlens[row]) + 1
                case["rows"].append({
                    "out_vs_ort_gqa": float(np.abs(outs["leptonc"][row, :real] - outs["ort_gqa"][row, :real]).max()),
                    "out_vs_reference": float(np.abs(outs["leptonc"][row, :real] - ref_out[row, :real]).max()),
                    "ort_gqa_vs_reference": float(np.abs(outs["ort_gqa"][row, :real] - ref_out[row, :real]).max()),
                    "k_vs_ort_gqa": float(np.abs(k_ours[row, :, :end] - k_ort[row, :, :end]).max()),
                    "v_vs_ort_gqa": float(np.abs(v_ours[row, :, :end] - v_ort[row, :, :end]).max())})
            worst = max(max(r["out_vs_ort_gqa"], r["out_vs_reference"]) for r in case["rows"])
            case["pass"] = worst < 2e-2 and max(max(r["k_vs_ort_gqa"], r["v_vs_ort_gqa"]) for r in case["rows"]) < 4e-3
            report["cases"].append(case)
            ref_k, ref_v = k_ours.copy(), v_ours.copy()  # the reference continues from our cache (padding included)
        # present left to ONNX Runtime: the op copies the past into a fresh present, then appends
        qkv, seqlens = steps[-1][0], lengths + 5
        past_k, past_v = (c.numpy() for c in caches["leptonc"])
        feeds = {"qkv": qkv, "past_key_values.0.key": past_k, "past_key_values.0.value": past_v,
                 "gqa/seqlens_k": seqlens.astype(np.int32), "gqa/total_sequence_length": np.array(cap, np.int32)}
        out, k_new, v_new = sessions["leptonc"].run(None, feeds)
        ref_out, ref_k, ref_v = cached_attention(qkv, past_k, past_v, seqlens, cap, cos, sin, num_heads=h,
                                                 kv_num_heads=kvh)
        copy_err = float(np.abs(out.astype(np.float64) - ref_out).max())
        k_err = float(np.abs(k_new.astype(np.float64) - ref_k).max())
        report["cases"].append({"heads": [h, kvh, d], "step": "decode, present not bound (copy path)",
                                "out_vs_reference": copy_err, "k_vs_reference": k_err,
                                "pass": copy_err < 2e-2 and k_err < 4e-3})
    report["all_pass"] = all(c["pass"] for c in report["cases"])
    return report


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("attention_check.json")
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        result = {"kernels": run_kernels(Path(tmp))}
        print(result["kernels"].get("log", result["kernels"]), flush=True)
        try:
            result["op"] = run_op()
        except Exception as exc:  # noqa: BLE001 - recorded: the point of the script is to see what fails
            result["op"] = {"error": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = round(time.time() - start, 1)
    out.write_text(json.dumps(result, indent=1))
    ok = result["kernels"].get("all_pass") and result["op"].get("all_pass")
    print(json.dumps({k: (v.get("all_pass"), v.get("error")) for k, v in result.items() if isinstance(v, dict)}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
