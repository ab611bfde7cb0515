"""One device call's worth of GPU work, through the `leptonc` CLI, with every command and its JSON kept.

Run on the lent H100 after the wheels are staged (see shared/device/README.md), from the repository root:

    export PYTHONPATH=/tmp/site:$PYTHONPATH
    python3 bench/device_session.py --out $OUT runtime      # issue 4: parity of the CUDA bundle, bench JSON
    python3 bench/device_session.py --out $OUT decode       # issue 8: every decode figure, HF ratios

Each step runs a `python3 -m leptonc ...` command; its argv, exit code, seconds, and parsed JSON go to
$OUT/session.json after every step (so a step that runs out of time still leaves the earlier ones).
A short table is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "The capital of France is"
WORK = Path(os.environ.get("LEPTONC_DEVICE_WORK", "/tmp/leptonc_work"))


class Session:
    def __init__(self, out: Path, name: str, budget_s: float):
        self.out, self.name = out, name
        self.deadline = time.time() + budget_s
        self.record: dict = {"session": name, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                             "machine": machine(), "steps": []}

    def save(self) -> None:
        (self.out / f"session_{self.name}.json").write_text(json.dumps(self.record, indent=1, default=str))

    def cli(self, label: str, *args: str, timeout: float = 900, env: dict | None = None) -> dict | None:
        argv = [sys.executable, "-m", "leptonc", *map(str, args)]
        shown = "leptonc " + " ".join(map(str, args))
        left = self.deadline - time.time()
        if left < 20:
            print(f"[{label}] skipped: the call's time budget is spent", flush=True)
            self.record["steps"].append({"label": label, "command": shown, "rc": "skipped (time budget)",
                                         "seconds": 0, "json": None})
            self.save()
            return None
        timeout = min(timeout, left)
        print(f"[{label}] {shown}", flush=True)
        start = time.time()
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  env={**os.environ, **(env or {})})
            rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, stdout, stderr = "timeout", exc.stdout or "", exc.stderr or ""
            stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
            stderr = stderr.decode() if isinstance(stderr, bytes) else stderr
        seconds = round(time.time() - start, 1)
        data = None
        if rc == 0:
            try:
                data = json.loads(stdout)
            except json.JSONDecodeError:
                data = None
        step = {"label": label, "command": shown, "env": env or {}, "rc": rc, "seconds": seconds, "json": data}
        if rc != 0:
            step["stderr_tail"] = stderr[-3000:]
            step["stdout_tail"] = stdout[-1500:]
            print(f"  FAILED rc={rc} in {seconds}s\n{stderr[-1500:]}", flush=True)
        else:
            print(f"  ok in {seconds}s", flush=True)
        self.record["steps"].append(step)
        self.save()
        return data


def machine() -> dict:
    info = {"python": platform.python_version()}
    try:
        info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                      "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except OSError:
        info["gpu"] = None
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["providers"] = ort.get_available_providers()
    except ImportError:
        pass
    return info


def compile_bundle(s: Session, source: str, target: str, name: str, *extra: str) -> Path | None:
    path = WORK / f"{name}.lepton"
    data = s.cli(f"compile {name}", "compile", source, "--target", target, "-o", path, "--force", "--json", *extra,
                 *(("--backend", "onnxruntime") if target != "cpu" else ()))
    if data is None:
        return None
    rep = data.get("report", {})
    s.record.setdefault("bundles", {})[name] = {
        "source": source, "target": target, "precision": data["manifest"]["precision"],
        "passes": data["manifest"].get("passes"), "graph": rep.get("graph", {}).get("op_counts"),
        "verification": data["manifest"].get("verification"), "export": rep.get("export")}
    return path


def greedy(s: Session, bundle: Path, label: str, n: int = 16) -> list[int] | None:
    data = s.cli(label, "run", bundle, "--prompt", PROMPT, "-n", n, "--ignore-eos", "--json", "--no-verify")
    return data["outputs"][0]["token_ids"] if data else None


def bench(s: Session, bundle: Path, label: str, *args: str, env: dict | None = None, timeout: float = 900):
    return s.cli(label, "bench", bundle, "--prompt-len", 128, "--gen-len", 128, "--warmup", 2, "--iters", 5,
                 "--json", "--no-verify", *args, env=env, timeout=timeout)


def runtime_session(s: Session) -> None:
    """Issue 4 acceptance 3: the h100 bundle's greedy tokens match the cpu fp32 bundle's; bench JSON."""
    cpu = compile_bundle(s, "smollm2-135m", "cpu", "smollm2.cpu")
    gpu = compile_bundle(s, "smollm2-135m", "h100", "smollm2.h100")
    cpu_ids = greedy(s, cpu, "greedy cpu fp32") if cpu else None
    gpu_ids = greedy(s, gpu, "greedy h100 fp16") if gpu else None
    if cpu_ids and gpu_ids:
        same = next((i for i, (a, b) in enumerate(zip(cpu_ids, gpu_ids)) if a != b), len(cpu_ids))
        s.record["parity"] = {"prompt": PROMPT, "cpu_fp32": cpu_ids, "h100_fp16": gpu_ids,
                              "identical_prefix": same, "first_16_match": same >= 16}
        s.save()
    if gpu:
        bench(s, gpu, "bench smollm2 h100", "--batch", "1,16", "--baseline", "hf")
    big = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", 1280)
    if big:
        bench(s, big, "bench llama-1b-shape h100", "--batch", "1,16")


def decode_session(s: Session) -> None:
    """Issue 8: fused fp16 and int4 bundles of both shapes; CUDA graphs on and off; TTFT at 1,024."""
    small = compile_bundle(s, "smollm2-135m", "h100", "smollm2.h100")
    if small:
        bench(s, small, "smollm2 fp16 (+hf)", "--batch", "1,16", "--baseline", "hf")
        bench(s, small, "smollm2 fp16 no-graph", "--batch", "1", "--iters", 3, env={"LEPTONC_CUDA_GRAPH": "0"})
    big = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", 1280)
    if big:
        bench(s, big, "llama1b fp16 (+hf)", "--batch", "1,16", "--baseline", "hf")
        bench(s, big, "llama1b fp16 no-graph", "--batch", "1", "--iters", 3, env={"LEPTONC_CUDA_GRAPH": "0"})
        s.cli("llama1b fp16 ttft 1024", "bench", big, "--prompt-len", 1024, "--gen-len", 2, "--batch", 1,
              "--warmup", 2, "--iters", 5, "--json", "--no-verify")
    q4 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100.int4", "--max-seq", 1280, "--int4")
    if q4:
        bench(s, q4, "llama1b int4", "--batch", "1,16")


def summary(s: Session) -> None:
    print("\n=== summary ===")
    for step in s.record["steps"]:
        data = step.get("json") or {}
        line = f"{step['label']:<28} rc={step['rc']} {step['seconds']:>6}s"
        for r in data.get("results", []) if isinstance(data, dict) else []:
            line += (f" | b{r['batch']}: {r.get('decode_tokens_per_s')} tok/s ttft {r.get('ttft_ms')} ms"
                     f" gpu {r.get('peak_gpu_mb')} MB floor {r.get('memory_floor', {}).get('floor_tokens_per_s')}")
        for c in data.get("comparison", []) if isinstance(data, dict) else []:
            line += f" | hf b{c['batch']}: {c['hf_decode_tokens_per_s']} ({c['decode_speedup']}x)"
        print(line)
    if "parity" in s.record:
        print("parity:", json.dumps(s.record["parity"]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("session", choices=("runtime", "decode"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    ap.add_argument("--budget", type=float, default=540, help="seconds for all steps (the call's limit is 600)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    s = Session(args.out, args.session, args.budget)
    print(json.dumps(s.record["machine"]), flush=True)
    try:
        (runtime_session if args.session == "runtime" else decode_session)(s)
    finally:
        s.save()
        summary(s)


if __name__ == "__main__":
    main()
