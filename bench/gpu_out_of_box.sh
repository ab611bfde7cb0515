#!/usr/bin/env bash
# GPU bundles out of the box, on the GPU machine (acceptance 2 and 3 of "GPU bundles out of the box").
#
# Staging, on the development machine (from the project root):
#   bash ../shared/device/stage.sh onnxruntime-gpu==1.31.1 nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 \
#        nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 onnx-graphsurgeon polygraphy \
#        gguf accelerate psutil
#   (about 250 MB: 6 parts; make the printed unpack calls back to back), and cross-compile here, with no GPU:
#   leptonc compile tiny-llama --target h100 -o out/xc/tiny.h100.lepton
#   carry out/xc and .ort-include (ONNX Runtime 1.29's C API headers, for the comparison build; git-ignored).
# Then on the GPU machine:  bash bench/gpu_out_of_box.sh $OUT
#
# 1. A fresh virtual environment (system site-packages for torch) gets `pip install ".[cuda]"` from the staged
#    wheels only, with no LEPTONC_ORT_INCLUDE, and without CUDA_HOME or an nvcc on PATH: nvcc comes from the wheel.
# 2. llama-1b-shape fp16 for h100 is compiled twice: with leptonc's own declarations (the default) and with the
#    ONNX Runtime release header (LEPTONC_ORT_INCLUDE=.ort-include); both must use leptonc's kernels; decode at
#    batch 1 is timed for both in this same run, alternating twice (acceptance: within 3%).
# 3. The bundle cross-compiled on the CPU machine passes `leptonc verify`, and its greedy tokens equal those of the
#    same model compiled here.
set -euo pipefail
OUT=${1:-/tmp/gpu_out_of_box}
mkdir -p "$OUT"
ROOT=$(pwd)
VENV=/tmp/leptonc-fresh
unset LEPTONC_ORT_INCLUDE CUDA_HOME CUDA_PATH PYTHONPATH  # fresh: not /tmp/site, where unpack.sh also installs the wheels
export LEPTONC_CACHE=/tmp/leptonc-fresh-cache PYTHONUNBUFFERED=1

python3 -m venv --system-site-packages "$VENV"
# onnxruntime-gpu replaces the CPU onnxruntime inside the venv; nothing comes from a registry
"$VENV/bin/pip" install -q --no-index --find-links /tmp/stage/wheels --no-build-isolation ".[cuda]" 2>&1 | tail -5
PATH="$VENV/bin:/usr/bin:/bin"  # no nvcc on PATH: the compile must find the wheel's
"$VENV/bin/python" - <<'EOF' | tee "$OUT/toolkit.txt"
from leptonc.targets import kernels
import onnxruntime as ort
print("nvcc:", kernels.find_toolkit(), "| ORT", ort.__version__, ort.get_available_providers())
EOF
L="$VENV/bin/leptonc"
cd /tmp
"$L" compile llama-1b-shape --target h100 --fp16 -o "$OUT/own.lepton" --json > "$OUT/compile_own.json"
LEPTONC_ORT_INCLUDE="$ROOT/.ort-include" "$L" compile llama-1b-shape --target h100 --fp16 -o "$OUT/release.lepton" \
  --json > "$OUT/compile_release.json"
"$VENV/bin/python" - "$OUT" <<'EOF'
import json, sys
for name in ("own", "release"):
    m = json.load(open(f"{sys.argv[1]}/compile_{name}.json"))["manifest"]
    k = m["engine"].get("kernels")
    assert k, f"{name}: no leptonc kernels in the bundle: {m['passes'][-1]}"
    print(name, "kernels:", k["arch"], k["ort_header"], "API", k["ort_api_version"], "nvcc via", k["nvcc_found_by"],
          "cublas", k["cublas"], "| backend:", m["backend_choice"])
EOF
for round in 1 2; do
  for name in own release; do
    "$L" bench "$OUT/$name.lepton" --batch 1 --prompt-len 128 --gen-len 128 --json > "$OUT/bench_${name}_$round.json"
  done
done
"$VENV/bin/python" - "$OUT" <<'EOF' | tee "$OUT/speed.txt"
import json, sys, glob
def tok_s(path):
    d = json.load(open(path))
    rows = d.get("results") or d.get("rows") or [d]
    return float(rows[0].get("decode_tokens_per_s") or rows[0].get("decode_tok_s"))
speeds = {n: [tok_s(p) for p in sorted(glob.glob(f"{sys.argv[1]}/bench_{n}_*.json"))] for n in ("own", "release")}
own, rel = sum(speeds["own"]) / 2, sum(speeds["release"]) / 2
print(f"decode tok/s at batch 1: own declarations {speeds['own']}, release header {speeds['release']}; "
      f"ratio {own / rel:.4f} ({'within' if abs(own / rel - 1) <= 0.03 else 'NOT within'} 3%)")
EOF
# acceptance 3: the cross-compiled bundle
XC="$ROOT/out/xc/tiny.h100.lepton"
cp -r "$XC" "$OUT/xc.lepton"
"$L" verify "$OUT/xc.lepton" --json | tee "$OUT/verify_xc.json"
"$L" compile tiny-llama --target h100 -o "$OUT/here.lepton" --json > "$OUT/compile_here.json"
for b in xc here; do
  "$L" run "$OUT/$b.lepton" --prompt "The capital of France is" -n 32 --json > "$OUT/run_$b.json"
done
"$VENV/bin/python" - "$OUT" <<'EOF' | tee "$OUT/greedy.txt"
import json, sys
ids = {b: json.load(open(f"{sys.argv[1]}/run_{b}.json"))["outputs"][0]["token_ids"] for b in ("xc", "here")}
print("greedy tokens", "SAME" if ids["xc"] == ids["here"] else "DIFFERENT", ids)
EOF
