"""Compile smollm2-135m int4 (RTN) with the int8 LM head / embedding at another block than the shipped 64, for the
CPU accuracy comparison in BENCHMARKS.md (session 19, line-2 leads). The block is a constant of
passes/quantize_nbits.py, not an option, so this script sets it for one compile:

    .venv/bin/python bench/head_block_cpu.py 64 b64.lepton
    .venv/bin/python bench/head_block_cpu.py 128 b128.lepton
    .venv/bin/leptonc compile smollm2-135m -o fp32.lepton
    .venv/bin/python bench/quant_cpu.py fp32.lepton b64.lepton b128.lepton --eval-tokens 8192 --window 1024 \\
        --stride 512 --rounds 0 --out head_block.json
"""

import sys

import leptonc.passes.quantize_nbits as quantize_nbits
from leptonc.cli import app

if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: head_block_cpu.py BLOCK OUTPUT.lepton")
    quantize_nbits.HEAD_BLOCK = int(sys.argv[1])
    app(["compile", "smollm2-135m", "--int4", "--int4-method", "rtn", "--max-ppl-increase", "60", "-o", sys.argv[2],
         "--force"])
