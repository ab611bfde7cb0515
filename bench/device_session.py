"""One device call's worth of GPU work, through the `leptonc` CLI, with every command and its JSON kept.

Run on the lent H100 after the wheels are staged (see shared/device/README.md), from the repository root:

    export PYTHONPATH=/tmp/site:$PYTHONPATH
    python3 bench/device_session.py --out $OUT runtime      # issue 4: parity of the CUDA bundle, bench JSON
    python3 bench/device_session.py --out $OUT decode_small # issue 8: fused fp16 bundles, HF ratios
    python3 bench/device_session.py --out $OUT decode_big   # issue 8: TTFT 1,024, cache ablation, int4

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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROMPT = "The capital of France is"
WORK = Path(os.environ.get("LEPTONC_DEVICE_WORK", "/tmp/leptonc_work"))


class Session:
    def __init__(self, out: Path, name: str, budget_s: float):
        self.out, self.name = out, name
        self.deadline = time.time() + budget_s
        self.record: dict = {"session": name, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                             "machine": machine(), "steps": []}
        self.lock = threading.Lock()  # compile_parallel's threads record their steps through one Session

    def save(self) -> None:
        with self.lock:
            text = json.dumps(self.record, indent=1, default=str)
            (self.out / f"session_{self.name}.json").write_text(text)

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


def compile_bundle(s: Session, source: str, target: str, name: str, *extra: str, env: dict | None = None) -> Path | None:
    path = WORK / f"{name}.lepton"
    data = s.cli(f"compile {name}", "compile", source, "--target", target, "-o", path, "--force", "--json", *extra,
                 *(("--backend", "onnxruntime") if target != "cpu" else ()), env=env)
    if data is None:
        return None
    rep = data.get("report", {})
    s.record.setdefault("bundles", {})[name] = {
        "source": source, "target": target, "precision": data["manifest"]["precision"],
        "passes": data["manifest"].get("passes"), "graph": rep.get("graph", {}).get("op_counts"),
        "verification": data["manifest"].get("verification"), "export": rep.get("export")}
    return path


def compile_parallel(s: Session, specs: list[tuple]) -> list[Path | None]:
    """compile_bundle for each (source, target, name, extra args, env) at once, one process each (the device has 16
    cores, and a compile spends most of its time on the CPU); the bundles in the order given."""
    with ThreadPoolExecutor(max_workers=len(specs)) as pool:
        futures = [pool.submit(compile_bundle, s, src, target, name, *extra, env=env)
                   for src, target, name, extra, env in specs]
        return [f.result() for f in futures]


def greedy(s: Session, bundle: Path, label: str, n: int = 16, env: dict | None = None) -> list[int] | None:
    data = s.cli(label, "run", bundle, "--prompt", PROMPT, "-n", n, "--ignore-eos", "--json", "--no-verify", env=env)
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


# Greedy ids of the cpu fp32 bundle for PROMPT (16 tokens), from session 1's `leptonc run` of
# smollm2.cpu.lepton (bench/results/2026-11-22_h100_runtime.json): the reference the GPU bundles must match.
CPU_FP32_GREEDY = [7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34, 32, 33, 40, 29, 32, 33]
GROWING = {"LEPTONC_KV_LAYOUT": "growing"}


def static_variant(s: Session, bundle: Path, name: str, compat_only: bool = False) -> Path | None:
    """EXPERIMENT: the static-length copy of a fused bundle (bench/device_static_variant.py), so the runner
    can capture decode in a CUDA graph. Figures from it are labelled experimental in BENCHMARKS.md."""
    dst = WORK / f"{name}.lepton"
    argv = [sys.executable, "bench/device_static_variant.py", str(bundle), str(dst)] + (["--compat-only"] if compat_only else [])
    proc = subprocess.run(argv, capture_output=True, text=True)
    s.record["steps"].append({"label": f"static variant {name}", "command": " ".join(argv[1:]), "rc": proc.returncode, "seconds": 0,
                              "json": None, "stdout_tail": proc.stdout[-500:], "stderr_tail": proc.stderr[-1500:]})
    s.save()
    print(f"[static variant {name}] rc={proc.returncode} {proc.stdout.strip()} {proc.stderr[-500:]}", flush=True)
    return dst if proc.returncode == 0 else None


def fused_bundle(s: Session, source: str, name: str, *extra: str) -> Path | None:
    """Compile the fused GPU bundle. Its GroupQueryAttention nodes carry ORT 1.32's 17th input, which the
    device's onnxruntime-gpu 1.31 refuses (so compile-time verification cannot open it there): compile
    with --no-verify, then a --compat-only copy drops that input; greedy parity on it stands in for verify."""
    raw = compile_bundle(s, source, "h100", name, "--no-verify", *extra)
    return static_variant(s, raw, name + ".compat", compat_only=True) if raw else None


def greedy_parity(s: Session, bundle: Path, env: dict | None = None) -> None:
    """The fused h100 bundle's 16 greedy tokens, alone and as row 0 of a padded batch of 3, beside the cpu
    fp32 bundle's (recorded under "parity")."""
    ids = greedy(s, bundle, "greedy fused h100 fp16")
    batch = s.cli("batched greedy fused", "run", bundle, "-p", PROMPT, "-p", "Water boils at", "-p", "Hi",
                  "-n", 16, "--ignore-eos", "--json", "--no-verify", env=env)
    s.record["parity"] = {"prompt": PROMPT, "cpu_fp32": CPU_FP32_GREEDY, "h100_fused_fp16": ids,
                          "h100_fused_fp16_in_batch_of_3": batch["outputs"][0]["token_ids"] if batch else None,
                          "batch_env": env or {}}
    s.save()


def decode_small(s: Session) -> None:
    """Issue 8, part 1: smollm2 fused fp16 (parity, batch 1/16 with the HF baseline, cache-layout ablation);
    then the llama-1b-shape fused fp16 bundle with the HF baseline."""
    small = fused_bundle(s, "smollm2-135m", "smollm2.h100")
    if small:
        greedy_parity(s, small)
        bench(s, small, "smollm2 fp16 (+hf)", "--batch", "1,16", "--baseline", "hf")
        bench(s, small, "smollm2 fp16 growing cache", "--batch", "1,16", "--iters", 3, env=GROWING)
        graph = static_variant(s, small, "smollm2.h100.static")
        if graph:
            s.record["parity"]["h100_static_cuda_graph"] = greedy(s, graph, "greedy static+cuda graph")
            s.save()
            bench(s, graph, "EXPERIMENT smollm2 fp16 cuda graph", "--batch", "1,16")


def decode_big(s: Session) -> None:
    """Issue 8, part 2 (same warm machine, bundles from part 1 kept in /tmp): TTFT at 1,024 tokens,
    the growing-cache ablation, and the int4 weight-only bundle (RTN: the weights are random, so the
    accuracy gates are skipped and say so)."""
    big = fused_bundle(s, "llama-1b-shape", "llama1b.h100", "--max-seq", 1280)
    if big:
        bench(s, big, "llama1b fp16 (+hf)", "--batch", "1,16", "--baseline", "hf")
        s.cli("llama1b fp16 ttft 1024", "bench", big, "--prompt-len", 1024, "--gen-len", 2, "--batch", 1,
              "--warmup", 2, "--iters", 5, "--json", "--no-verify")
        bench(s, big, "llama1b fp16 growing cache", "--batch", "1,16", "--iters", 3, env=GROWING)
        graph = static_variant(s, big, "llama1b.h100.static")
        if graph:
            bench(s, graph, "EXPERIMENT llama1b fp16 cuda graph", "--batch", "1,16")


def decode_int4(s: Session) -> None:
    """Issue 8, part 3: the int4 weight-only (MatMulNBits) llama-1b-shape bundle. RTN scales: the weights
    are random, so the accuracy gates are skipped (--no-check) and say so."""
    q4 = fused_bundle(s, "llama-1b-shape", "llama1b.h100.int4", "--max-seq", 1280, "--int4",
                      "--int4-method", "rtn", "--no-check")
    if q4:
        bench(s, q4, "llama1b int4 (+hf)", "--batch", "1,16", "--baseline", "hf")
        graph = static_variant(s, q4, "llama1b.h100.int4.static")
        if graph:
            bench(s, graph, "EXPERIMENT llama1b int4 cuda graph", "--batch", "1,16")


def decode_final(s: Session) -> None:
    """Issue 8, last session: the fused fp16 bundles again with the runner's on-device last-position
    slice (prefill hands B x vocab to the host), each with the HF baseline in the same run; TTFT at
    1,024 tokens; and ONNX Runtime's profile of smollm2's decode step (where the time goes)."""
    small = fused_bundle(s, "smollm2-135m", "smollm2.h100")
    if small:
        ids = greedy(s, small, "greedy fused h100 fp16")
        s.record["parity"] = {"prompt": PROMPT, "cpu_fp32": CPU_FP32_GREEDY, "h100_fused_fp16": ids}
        s.save()
        bench(s, small, "smollm2 fp16 (+hf)", "--batch", "1,16", "--baseline", "hf")
        proc = subprocess.run([sys.executable, "bench/device_profile.py", str(small), str(s.out / "profile_smollm2.json")],
                              capture_output=True, text=True, timeout=180)
        print(proc.stdout[-3500:], proc.stderr[-1500:], flush=True)
    big = fused_bundle(s, "llama-1b-shape", "llama1b.h100", "--max-seq", 1280)
    if big:
        bench(s, big, "llama1b fp16 (+hf)", "--batch", "1,16", "--baseline", "hf")
        s.cli("llama1b fp16 ttft 1024", "bench", big, "--prompt-len", 1024, "--gen-len", 2, "--batch", 1,
              "--warmup", 2, "--iters", 5, "--json", "--no-verify")


def graph_probe(s: Session) -> None:
    """EXPERIMENT: decode in a CUDA graph through bench/device_graph_probe.py (static-length copy plus a
    decode graph specialised to the batch size), for both models at batch 1 and 16."""
    for source, name, extra in (("smollm2-135m", "smollm2.h100", ()),
                                ("llama-1b-shape", "llama1b.h100", ("--max-seq", 1280))):
        compat = fused_bundle(s, source, name, *extra)
        graph = static_variant(s, compat, name + ".static") if compat else None
        if not graph:
            continue
        for batch in (1, 16):
            out = s.out / f"probe_{name}_b{batch}.json"
            left = s.deadline - time.time()
            if left < 30:
                break
            proc = subprocess.run([sys.executable, "bench/device_graph_probe.py", str(graph), str(out), str(batch), "512"],
                                  capture_output=True, text=True, timeout=left)
            data = json.loads(out.read_text()) if out.is_file() else None
            s.record["steps"].append({"label": f"EXPERIMENT cuda graph probe {name} b{batch}",
                                      "command": f"python3 bench/device_graph_probe.py {graph} OUT.json {batch} 512",
                                      "rc": proc.returncode, "seconds": 0, "json": data,
                                      "stderr_tail": proc.stderr[-1500:]})
            s.save()
            print(f"[probe {name} b{batch}] rc={proc.returncode} {json.dumps(data)[:600] if data else proc.stderr[-800:]}",
                  flush=True)


def passes_compare(s: Session, fused: Path, plain: Path, name: str) -> None:
    """Issue 5: fused vs --no-passes decode at batch 1 on this GPU, both bundles in one process
    (bench/passes_cpu.py runs any two bundles round by round, on the device their runners choose)."""
    out = s.out / f"passes_{name}.json"
    cmd = [sys.executable, "bench/passes_cpu.py", str(fused), str(plain), "--prompt-len", "128", "--gen-len", "128",
           "--rounds", "3", "--iters", "3", "--out", str(out)]
    left = s.deadline - time.time()
    if left < 40:
        return
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
    data = json.loads(out.read_text()) if out.is_file() else None
    s.record["steps"].append({"label": f"passes fused vs plain {name}", "command": " ".join(cmd[1:]),
                              "rc": proc.returncode, "seconds": round(time.time() - start, 1), "json": data,
                              "stderr_tail": proc.stderr[-1500:]})
    s.save()
    print(f"[passes {name}] rc={proc.returncode} {json.dumps(data)[-700:] if data else proc.stderr[-800:]}", flush=True)


def step_probe(s: Session, bundle: Path, name: str, batch: int = 1) -> None:
    """Where a decode step's time goes (bench/device_step_probe.py): host round trip vs GPU replay."""
    out = s.out / f"probe_{name}_b{batch}.json"
    cmd = [sys.executable, "bench/device_step_probe.py", str(bundle), str(out), "--batch", str(batch)]
    left = s.deadline - time.time()
    if left < 30:
        return
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
    data = json.loads(out.read_text()) if out.is_file() else None
    s.record["steps"].append({"label": f"step probe {name} b{batch}", "command": " ".join(cmd[1:]),
                              "rc": proc.returncode, "seconds": 0, "json": data, "stderr_tail": proc.stderr[-1500:]})
    s.save()
    print(f"[probe {name} b{batch}] rc={proc.returncode} {json.dumps(data) if data else proc.stderr[-800:]}", flush=True)


def cuda_graph(s: Session) -> None:
    """Issue 8 / 5 with the GPU length contract (right padding, fixed-shape decode, CUDA graphs in the
    shipped bundle): smollm2 fused (verified at compile time) and plain; greedy parity alone and in a
    padded batch; bench with the HF baseline; fused vs plain in one process."""
    small = compile_bundle(s, "smollm2-135m", "h100", "smollm2.h100")
    plain = compile_bundle(s, "smollm2-135m", "h100", "smollm2.h100.plain", "--no-passes")
    if small:
        greedy_parity(s, small)
        bench(s, small, "smollm2 fp16 (+hf)", "--batch", "1,16", "--baseline", "hf")
    if small and plain:
        passes_compare(s, small, plain, "smollm2_h100")
    if small:
        step_probe(s, small, "smollm2")


def cuda_graph_big(s: Session) -> None:
    """Issue 8 on llama-1b-shape with the GPU length contract: fp16 (+HF, TTFT at 1,024 tokens) and int4."""
    big = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", "1280")
    if big:
        bench(s, big, "llama1b fp16 (+hf)", "--batch", "1,16", "--baseline", "hf")
        s.cli("llama1b fp16 ttft 1024", "bench", big, "--prompt-len", 1024, "--gen-len", 2, "--batch", 1,
              "--warmup", 2, "--iters", 5, "--json", "--no-verify")
        step_probe(s, big, "llama1b")
    q4 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100.int4", "--max-seq", "1280", "--int4",
                        "--int4-method", "rtn", "--no-check")
    if q4:
        bench(s, q4, "llama1b int4", "--batch", "1,16")
        step_probe(s, q4, "llama1b_int4")


def script(s: Session, label: str, *argv: str, out_name: str, timeout: float, env: dict | None = None,
           interpreter: str | None = sys.executable) -> dict | None:
    """A bench/ script (or, with interpreter None, a program) run as one step; its JSON file is kept in the session
    record and returned."""
    out = s.out / out_name
    cmd = [*([interpreter] if interpreter else []), *argv, str(out)]
    left = s.deadline - time.time()
    if left < 30:
        print(f"[{label}] skipped: the call's time budget is spent", flush=True)
        return None
    shown = " ".join(cmd[1:] if interpreter else cmd)
    print(f"[{label}] {shown} {json.dumps(env or {})}", flush=True)
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=min(timeout, left),
                              env={**os.environ, **(env or {})})
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as exc:
        rc, tail = "timeout", str(exc.stdout or "")[-3000:]
    data = json.loads(out.read_text()) if out.is_file() else None
    s.record["steps"].append({"label": label, "command": shown, "env": env or {}, "rc": rc,
                              "seconds": round(time.time() - start, 1), "json": data, "tail": tail})
    s.save()
    print(tail[-2500:], flush=True)
    return data


def fpa_memory(s: Session) -> None:
    """Issue 8 lines 2 and 6 (session 6). MatMulNBits layouts and ONNX Runtime's CUTLASS weight-only path
    (bench/device_nbits_probe.py); llama-1b-shape fp16 and int4 (RTN) benched in one call, int4 with the
    fpA_intB path on and off; where device memory goes (bench/device_memory_probe.py) with CUDA graphs
    on/off and with the arena given back after each prefill. HISTORICAL: the runner's
    LEPTONC_FPA_INTB_GEMM switch used here was removed after this run (no effect on the shipped int4
    layout: 859 vs 864 tok/s at batch 1, 4,115 vs 4,238 at batch 16), as was LEPTONC_ARENA_SHRINK."""
    script(s, "nbits probe", "bench/device_nbits_probe.py", "--reps", "4", "--iters", "100",
           out_name="nbits_probe.json", timeout=150)
    big = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", "1280")
    q4 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100.int4", "--max-seq", "1280", "--int4",
                        "--int4-method", "rtn", "--no-check")
    if big:
        bench(s, big, "llama1b fp16", "--batch", "1,16")
    if q4:
        bench(s, q4, "llama1b int4 fpA_intB on", "--batch", "1,16", env={"LEPTONC_FPA_INTB_GEMM": "1"})
        bench(s, q4, "llama1b int4 fpA_intB off", "--batch", "1,16", env={"LEPTONC_FPA_INTB_GEMM": "0"})
    if big:
        # (This call also ran LEPTONC_ARENA_SHRINK=1, an experiment since removed: giving the arena back after
        # a prefill freed memory a captured decode graph still used, and the next replay faulted.)
        for tag, env in (("default", {}), ("no graph", {"LEPTONC_CUDA_GRAPH": "0"})):
            script(s, f"memory probe llama1b {tag}", "bench/device_memory_probe.py", str(big),
                   out_name=f"memory_llama1b_{tag.replace(' ', '_')}.json", timeout=90, env=env)


def attn_memory(s: Session) -> None:
    """Issue 8 lines 2 and 6 (session 6, second call): the MatMulNBits layout probe again (the first run's
    models carried an IR version ORT 1.31 refuses); which attention kernel GroupQueryAttention's prefill
    runs and what its scratch costs: llama-1b-shape fp16 memory and speed with ONNX Runtime's flash or
    memory-efficient attention switched off (its ORT_DISABLE_* variables)."""
    script(s, "nbits probe", "bench/device_nbits_probe.py", "--reps", "4", "--iters", "100",
           out_name="nbits_probe.json", timeout=170)
    big = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", "1280")
    if not big:
        return
    variants = (("default", {}), ("no flash", {"ORT_DISABLE_FLASH_ATTENTION": "1"}),
                ("no mem-efficient", {"ORT_DISABLE_MEMORY_EFFICIENT_ATTENTION": "1"}))
    for tag, env in variants:
        script(s, f"memory probe llama1b {tag}", "bench/device_memory_probe.py", str(big),
               out_name=f"memory_llama1b_{tag.replace(' ', '_')}.json", timeout=60, env=env)
    for tag, env in variants:
        bench(s, big, f"llama1b fp16 {tag}", "--batch", "1,16", env=env)
        s.cli(f"llama1b ttft 1024 {tag}", "bench", big, "--prompt-len", 1024, "--gen-len", 2, "--batch", 1,
              "--warmup", 2, "--iters", 5, "--json", "--no-verify", env=env)


def kv_block(s: Session) -> None:
    """Issue 8 line 6 (session 6, third call): the K/V cache as one device block per batch size and the
    prefill in row chunks of at most 512 tokens. llama-1b-shape fp16 memory and speed, smollm2 greedy
    parity with every row of a padded batch prefilled on its own (LEPTONC_PREFILL_TOKENS=4), int4 peaks."""
    big = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", "1280")
    if big:
        bench(s, big, "llama1b fp16", "--batch", "1,16")
        s.cli("llama1b fp16 ttft 1024", "bench", big, "--prompt-len", 1024, "--gen-len", 2, "--batch", 1,
              "--warmup", 2, "--iters", 5, "--json", "--no-verify")
        script(s, "memory probe llama1b kv block", "bench/device_memory_probe.py", str(big),
               out_name="memory_llama1b_kv_block.json", timeout=60)
    small = compile_bundle(s, "smollm2-135m", "h100", "smollm2.h100")
    if small:
        greedy_parity(s, small, env={"LEPTONC_PREFILL_TOKENS": "4"})
        bench(s, small, "smollm2 fp16", "--batch", "1,16")
    q4 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100.int4", "--max-seq", "1280", "--int4",
                        "--int4-method", "rtn", "--no-check")
    if q4:
        bench(s, q4, "llama1b int4", "--batch", "1,16")


def kv_exact(s: Session) -> None:
    """Issue 8 lines 5 and 6 (session 7): the K/V block allocated by an ONNX Runtime session (exact size)
    instead of the Python module's power-of-two arena, with the prefill chunk budget at its default
    (4,096 tokens) and at 512, by memory probe and bench; time to first token at 1,024 tokens with 20
    timed runs, with ONNX Runtime's CUDA TunableOp off (default) and on (ORT_CUDA_TUNABLE_OP_*)."""
    big = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", "1280")
    if not big:
        return
    for tokens in ("4096", "512"):
        script(s, f"memory probe llama1b prefill {tokens}", "bench/device_memory_probe.py", str(big),
               out_name=f"memory_llama1b_exact_{tokens}.json", timeout=40, env={"LEPTONC_PREFILL_TOKENS": tokens})
    bench(s, big, "llama1b fp16", "--batch", "1,16")
    ttft = ("bench", big, "--prompt-len", 1024, "--gen-len", 2, "--batch", 1, "--warmup", 3, "--iters", 20,
            "--json", "--no-verify")
    s.cli("llama1b fp16 ttft 1024", *ttft)
    s.cli("llama1b fp16 ttft 1024 tunableop", *ttft,
          env={"ORT_CUDA_TUNABLE_OP_ENABLE": "1", "ORT_CUDA_TUNABLE_OP_TUNING_ENABLE": "1"})
    s.cli("llama1b fp16 ttft 1024 again", *ttft)
    small = compile_bundle(s, "smollm2-135m", "h100", "smollm2.h100")
    if small:
        bench(s, small, "smollm2 fp16 (+hf)", "--batch", "1,16", "--baseline", "hf")


def gemv(s: Session) -> None:
    """Issue 8 lines 1 and 3 (session 7, second call): fp16 weight layouts at decode sizes in CUDA graphs
    (bench/device_gemv_probe.py): MatMul on [K, N] against FusedMatMul / Gemm on [N, K] with transB."""
    script(s, "gemv probe", "bench/device_gemv_probe.py", "--iters", "200", out_name="gemv_probe.json", timeout=300)


def kernels_llama(s: Session) -> None:
    """Issue 8 line 2 (session 8): leptonc's CUDA MatMulNBits (targets/kernels/). The op alone against ONNX
    Runtime's (bench/device_kernels.py: correctness, time per product in CUDA graphs), then llama-1b-shape
    fp16 and int4 (RTN) with it, batch 1 and 16, in one call."""
    script(s, "kernels op check + speed", "bench/device_kernels.py", out_name="kernels.json", timeout=220)
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"  # the default since session 11; set for the earlier commits too
    fp16 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", "1280")
    q4 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100.int4", "--max-seq", "1280", "--int4",
                        "--int4-method", "rtn", "--no-check")
    if fp16:
        bench(s, fp16, "llama1b fp16", "--batch", "1,16")
    if q4:
        bench(s, q4, "llama1b int4 (leptonc kernel)", "--batch", "1,16")


def kernels(s: Session) -> None:
    """kernels_llama, then smollm2-135m int4 greedy tokens and speed with either kernel."""
    kernels_llama(s)
    small = compile_bundle(s, "smollm2-135m", "h100", "smollm2.h100.int4", "--int4", "--int4-method", "rtn", "--no-check")
    small_ort = compile_bundle(s, "smollm2-135m", "h100", "smollm2.h100.int4.ortkernel", "--int4", "--int4-method", "rtn",
                               "--no-check", "--disable-pass", "use_leptonc_kernels")
    ids = {}
    for name, b in (("leptonc", small), ("onnxruntime", small_ort)):
        if b:
            ids[name] = greedy(s, b, f"greedy smollm2 int4 {name} kernel", n=32)
    s.record["parity"] = {"smollm2 int4 greedy, leptonc vs ORT kernel": ids}
    if small and small_ort:
        bench(s, small, "smollm2 int4 (leptonc kernel)", "--batch", "1,16")
        bench(s, small_ort, "smollm2 int4 (ORT kernel)", "--batch", "1,16")


def int4_accuracy(s: Session) -> None:
    """smollm2-135m int4 AWQ on the GPU target (fp16 graph): GPTQ codes (the default) and nearest rounding,
    each compile's accuracy gate run on the H100 (perplexity on leptonc/data/heldout.txt against the
    unquantized model), 32 greedy tokens each, and the int4 decode speed of the GPTQ bundle."""
    for name, extra in (("smollm2.h100.int4.gptq", ()), ("smollm2.h100.int4.nearest", ("--int4-rounding", "nearest"))):
        b = compile_bundle(s, "smollm2-135m", "h100", name, "--int4", "--max-ppl-increase", "60", *extra)
        if b:
            s.record.setdefault("parity", {})[name] = greedy(s, b, f"greedy {name}", n=32)
            if name.endswith("gptq"):
                bench(s, b, "smollm2 int4 gptq", "--batch", "1,16")


def int4_awq_speed(s: Session) -> None:
    """smollm2-135m int4 on the H100 in one call: AWQ + GPTQ (the default: one prescale Mul a layer, before
    the o projection) against RTN (no prescale), decode at batch 1 and 16, ONNX Runtime's kernel."""
    awq = compile_bundle(s, "smollm2-135m", "h100", "smollm2.h100.int4.awq", "--int4", "--max-ppl-increase", "60")
    rtn = compile_bundle(s, "smollm2-135m", "h100", "smollm2.h100.int4.rtn", "--int4", "--int4-method", "rtn",
                         "--no-check")
    for name, b in (("awq", awq), ("rtn", rtn)):
        if b:
            s.record.setdefault("parity", {})[name] = greedy(s, b, f"greedy smollm2 int4 {name}", n=32)
    for rnd in range(2):  # interleaved: awq, rtn, awq, rtn
        for name, b in (("awq", awq), ("rtn", rtn)):
            if b:
                bench(s, b, f"smollm2 int4 {name} round {rnd + 1}", "--batch", "1,16")


def greedy_device(s: Session) -> None:
    """Issue 8 (session 12): the greedy token computed in the graph (passes/greedy_token.py), so a decode
    step copies B tokens to the host instead of B x vocab logits. Each bundle is benched with it and with
    LEPTONC_DEVICE_ARGMAX=0 (the logits copied and argmaxed on the host, as before), interleaved, in one
    call; greedy tokens with either must be identical. smollm2 fp16 runs with the HF baseline (line 7)."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    fp16 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", "1280")
    q4 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100.int4", "--max-seq", "1280", "--int4",
                        "--int4-method", "rtn", "--no-check")
    small = compile_bundle(s, "smollm2-135m", "h100", "smollm2.h100")
    host = {"LEPTONC_DEVICE_ARGMAX": "0"}
    parity = s.record.setdefault("parity", {})
    for name, b in (("llama1b int4", q4), ("smollm2 fp16", small)):
        if b:
            got = {}
            for how, env in (("device", None), ("host", host)):
                data = s.cli(f"greedy {name} ({how} argmax)", "run", b, "--prompt", PROMPT, "-n", 32, "--ignore-eos",
                             "--json", "--no-verify", env=env)
                got[how] = data["outputs"][0]["token_ids"] if data else None
            parity[name] = {**got, "identical": got["device"] is not None and got["device"] == got["host"]}
    s.save()
    for rnd in range(2):
        for name, b in (("llama1b fp16", fp16), ("llama1b int4", q4)):
            if b:
                bench(s, b, f"{name} round {rnd + 1}", "--batch", "1,16")
                bench(s, b, f"{name} host argmax round {rnd + 1}", "--batch", "1,16", env=host)
    if fp16:
        s.cli("llama1b fp16 ttft 1024", "bench", fp16, "--prompt-len", 1024, "--gen-len", 2, "--batch", 1,
              "--warmup", 2, "--iters", 5, "--json", "--no-verify")
    if small:
        bench(s, small, "smollm2 fp16 (+hf)", "--batch", "1,16", "--baseline", "hf")
        bench(s, small, "smollm2 fp16 host argmax", "--batch", "1,16", env=host)


def fp16_kernels_ab(s: Session, check_out: str, label: str, smollm2_hf: bool) -> None:
    """fp16 bundles compiled as shipped (leptonc's kernels on) against the same compile on ONNX Runtime's ops
    (--disable-pass use_leptonc_kernels), in one call: the fp16 ops against float64 references, smollm2's
    32 greedy tokens with either, speed interleaved (llama two rounds, smollm2 once)."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    script(s, "fp16 ops check", "bench/device_kernels.py", "--fp16-only", out_name=check_out, timeout=150)
    off = ("--disable-pass", "use_leptonc_kernels")
    big = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", "1280")
    big_off = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100.nokernels", "--max-seq", "1280", *off)
    small = compile_bundle(s, "smollm2-135m", "h100", "smollm2.h100")
    small_off = compile_bundle(s, "smollm2-135m", "h100", "smollm2.h100.nokernels", *off)
    ids = {}
    for name, b in ((label, small), ("onnxruntime ops", small_off)):
        if b:
            ids[name] = greedy(s, b, f"greedy smollm2 fp16 {name}", n=32)
    s.record["parity"] = {f"smollm2 fp16 greedy, {label} vs ONNX Runtime's ops": ids,
                          "identical": len(ids) == 2 and None not in ids.values() and len(set(map(tuple, ids.values()))) == 1}
    s.save()
    for rnd in range(2):
        for name, b in ((f"llama1b fp16 {label}", big), ("llama1b fp16 no kernels", big_off)):
            if b:
                bench(s, b, f"{name} round {rnd + 1}", "--batch", "1,16")
    if small:
        bench(s, small, f"smollm2 fp16 {label}" + (" (+hf)" if smollm2_hf else ""), "--batch", "1,16",
              *(("--baseline", "hf") if smollm2_hf else ()))
    if small_off:
        bench(s, small_off, "smollm2 fp16 no kernels", "--batch", "1,16")


def fp16_swiglu(s: Session) -> None:
    """Issue 8 lines 1 and 3 (session 12, call 1, commit ae1f389): the SwiGLU op (Split + QuickGelu + Mul ->
    ai.leptonc.SwiGLU) against ONNX Runtime's ops; smollm2 with the HF baseline (line 7)."""
    fp16_kernels_ab(s, "swiglu_check.json", "swiglu kernel", smollm2_hf=True)


def f16_gemv(s: Session) -> None:
    """Issue 8 lines 1 and 3 (session 12, call 4): MatMulF16 (every product with constant weights, the
    SwiGLU epilogue on gate|up, the LM head) against ONNX Runtime's ops."""
    fp16_kernels_ab(s, "fp16_check.json", "leptonc kernels", smollm2_hf=False)


def ttft_hf(s: Session) -> None:
    """Issue 8 lines 5 and 7 on the final session-12 code: llama-1b-shape fp16 (MatMulF16 in prefill too),
    time to first token for a 1,024-token prompt over 20 runs, and decode beside Hugging Face eager."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    fp16 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", "1280")
    if fp16:
        s.cli("llama1b fp16 ttft 1024", "bench", fp16, "--prompt-len", 1024, "--gen-len", 2, "--batch", 1,
              "--warmup", 3, "--iters", 20, "--json", "--no-verify")
        bench(s, fp16, "llama1b fp16 (+hf)", "--batch", "1,16", "--baseline", "hf")


def ncu_step(s: Session, bundle: Path, name: str) -> None:
    """One batch-1 decode step's kernels under Nsight Compute (bench/device_kernel_times.py)."""
    import glob
    import shutil

    ncu = shutil.which("ncu") or next(iter(sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu")) +
                                           glob.glob("/usr/local/cuda/bin/ncu")), None)
    left = s.deadline - time.time()
    if ncu is None or left < 40:
        s.record["steps"].append({"label": f"ncu {name}", "rc": "skipped", "why": "no ncu" if ncu is None else "time"})
        return
    csv_path, out = s.out / f"ncu_{name}.csv", s.out / f"kernel_times_{name}.json"
    cmd = [ncu, "--profile-from-start", "off", "--clock-control", "none", "--print-units", "base",
           "--metrics", "gpu__time_duration.sum",
           "--csv", "--log-file", str(csv_path), sys.executable, "bench/device_kernel_times.py", str(bundle)]
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=min(240, left))
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-2000:]
    except subprocess.TimeoutExpired as exc:
        rc, tail = "timeout", str(exc.stdout or "")[-2000:]
    data = None
    if csv_path.is_file():
        summ = subprocess.run([sys.executable, "bench/device_kernel_times.py", "--summarize", str(csv_path), str(out)],
                              capture_output=True, text=True)
        tail += summ.stdout[-3000:] + summ.stderr[-1000:]
        data = json.loads(out.read_text()) if out.is_file() else None
    s.record["steps"].append({"label": f"ncu {name}", "command": " ".join(cmd[1:]), "rc": rc,
                              "seconds": round(time.time() - start, 1), "json": data, "tail": tail})
    s.save()
    print(f"[ncu {name}] rc={rc}\n{tail[-2500:]}", flush=True)


def kernel_times(s: Session) -> None:
    """Where a batch-1 decode step's GPU time goes, kernel by kernel (Nsight Compute): smollm2 fp16, then
    llama-1b-shape fp16 and int4, each as shipped by default (leptonc's kernels on)."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    small = compile_bundle(s, "smollm2-135m", "h100", "smollm2.h100")
    if small:
        ncu_step(s, small, "smollm2_fp16")
    big = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", "1280")
    if big:
        ncu_step(s, big, "llama1b_fp16")
    q4 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100.int4", "--max-seq", "1280", "--int4",
                        "--int4-method", "rtn", "--no-check")
    if q4:
        ncu_step(s, q4, "llama1b_int4")


def llama_fp16_int4(s: Session, rounds: int) -> tuple[Path | None, Path | None]:
    """llama-1b-shape compiled in fp16 and int4 (RTN: its weights are random), decode at batch 1 and 16, the two
    interleaved `rounds` times. Returns the two bundles (None where a compile failed)."""
    fp16 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", "1280")
    q4 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100.int4", "--max-seq", "1280", "--int4",
                        "--int4-method", "rtn", "--no-check")
    for rnd in range(rounds):
        for name, b in (("llama1b fp16", fp16), ("llama1b int4", q4)):
            if b:
                bench(s, b, f"{name} round {rnd + 1}", "--batch", "1,16")
    return fp16, q4


def confirm(s: Session) -> None:
    """Issue 8 (session 12, last call): the committed state (greedy token in the graph, SwiGLU kernel, one
    input copy a step) on llama-1b-shape fp16 and int4, three interleaved rounds at batch 1 and 16, where
    a step's time goes (bench/device_step_probe.py), then smollm2-135m fp16."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    fp16, q4 = llama_fp16_int4(s, rounds=3)
    for name, b in (("llama1b", fp16), ("llama1b_int4", q4)):
        if b:
            step_probe(s, b, name)
    small = compile_bundle(s, "smollm2-135m", "h100", "smollm2.h100")
    if small:
        bench(s, small, "smollm2 fp16", "--batch", "1,16")
        step_probe(s, small, "smollm2")


def greedy_pair(s: Session, what: str, bundles: dict) -> None:
    """32 greedy tokens from each of two bundles (name -> path); the record says whether they are identical."""
    ids = {name: greedy(s, b, f"greedy {name}", n=32) for name, b in bundles.items() if b}
    s.record["parity"] = {what: ids,
                          "identical": len(ids) == 2 and None not in ids.values() and len(set(map(tuple, ids.values()))) == 1}
    s.save()


def greedy_env_pair(s: Session, bundle: Path, label: str, what: str, env: dict) -> None:
    """32 greedy tokens of one bundle with its defaults and with `env`; the record says whether they are identical."""
    ids = {name: greedy(s, bundle, f"greedy {label} {name}", n=32, env=e) for name, e in (("defaults", {}),
                                                                                       ("changed", env))}
    s.record.setdefault("parity", {})[what] = {**ids, "identical": None not in ids.values()
                                              and ids["defaults"] == ids["changed"]}
    s.save()


ATTENTION_ON, ATTENTION_OFF = {"LEPTONC_ATTENTION_KERNEL": "1"}, {"LEPTONC_ATTENTION_KERNEL": "0"}


def _attention_checked(s: Session, env: dict | None = None) -> bool:
    data = script(s, "attention check", "bench/device_attention_check.py", out_name="attention_check.json",
                  timeout=300, env=env) or {}
    ok = bool(data.get("kernels", {}).get("all_pass") and data.get("op", {}).get("all_pass"))
    s.record["attention_check_pass"] = ok
    s.save()
    if not ok:
        print(f"CachedAttention failed its check ({json.dumps(env or {})}): no bundle uses it in this call", flush=True)
    return ok


def _llama_int4_fp16(s: Session) -> tuple[Path | None, Path | None]:
    """llama-1b-shape compiled in int4 (RTN: its weights are random) and fp16, as every issue-8 call compiles them."""
    q4 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100.int4", "--max-seq", "1280", "--int4",
                        "--int4-method", "rtn", "--no-check")
    return q4, compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", "1280")


def attention(s: Session) -> None:
    """Issue 8 line 3 (session 13's ai.leptonc.CachedAttention, its first run on a GPU): the op alone against ONNX
    Runtime's GroupQueryAttention and a float64 reference (bench/device_attention_check.py); only if that passes,
    smollm2-135m fp16 compiled with it (LEPTONC_ATTENTION_KERNEL=1) against the same compile without, in one call:
    32 greedy tokens each, decode at batch 1 and 16, interleaved twice; then each batch-1 decode step's kernels under
    Nsight Compute."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    if not _attention_checked(s):
        return
    on = compile_bundle(s, "smollm2-135m", "h100", "smollm2.h100.attn", env=ATTENTION_ON)
    off = compile_bundle(s, "smollm2-135m", "h100", "smollm2.h100", env=ATTENTION_OFF)
    greedy_pair(s, "smollm2 fp16 greedy, CachedAttention vs GroupQueryAttention",
                  {"smollm2 fp16 attention kernel": on, "smollm2 fp16 gqa": off})
    for rnd in range(2):
        for name, b in (("smollm2 fp16 attention kernel", on), ("smollm2 fp16 gqa", off)):
            if b:
                bench(s, b, f"{name} round {rnd + 1}", "--batch", "1,16")
    for name, b in (("smollm2_fp16_attention_kernel", on), ("smollm2_fp16_gqa", off)):  # where a step's time goes
        if b:
            ncu_step(s, b, name)


def attention_llama(s: Session) -> None:
    """Issue 8 lines 1 and 5 with CachedAttention (after `attention` passed): llama-1b-shape fp16 with it against
    without, decode at batch 1 and 16 interleaved twice, then time to first token at 1,024 tokens with it."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    on = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100.attn", "--max-seq", "1280", env=ATTENTION_ON)
    off = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", "1280", env=ATTENTION_OFF)
    for rnd in range(2):
        for name, b in (("llama1b fp16 attention kernel", on), ("llama1b fp16 gqa", off)):
            if b:
                bench(s, b, f"{name} round {rnd + 1}", "--batch", "1,16")
    if on:
        s.cli("llama1b fp16 attention kernel ttft 1024", "bench", on, "--prompt-len", 1024, "--gen-len", 2, "--batch", 1,
              "--warmup", 3, "--iters", 20, "--json", "--no-verify")


NORM_ON, NORM_OFF = {"LEPTONC_NORM_PROLOGUE": "1"}, {"LEPTONC_NORM_PROLOGUE": "0"}


def norm(s: Session) -> None:
    """Issue 8 lines 1 and 3 (session 15): NormMatMulF16, each residual SkipSimplifiedLayerNormalization folded into
    the product it feeds. The fp16 ops against float64 first (bench/device_kernels.py --fp16-only; NormMatMulF16's
    product and its sum output); only if they pass: smollm2-135m and llama-1b-shape fp16 compiled with the fold
    (the default) against the same compile without (LEPTONC_NORM_PROLOGUE=0), 32 greedy tokens of smollm2 with each,
    decode at batch 1 and 16 interleaved twice, then llama's time to first token at 1,024 tokens with the fold."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    data = script(s, "fp16 ops check", "bench/device_kernels.py", "--fp16-only", out_name="norm_check.json",
                  timeout=150) or {}
    rows = [r for r in data.get("check", []) if r.get("case") == "NormMatMulF16"]
    ok = bool(data.get("check_ok")) and bool(rows)
    s.record["norm_check_pass"] = ok
    if not ok:
        print("NormMatMulF16 failed its check: no bundle uses it in this call", flush=True)
        return
    on = compile_bundle(s, "smollm2-135m", "h100", "smollm2.h100.norm", env=NORM_ON)
    off = compile_bundle(s, "smollm2-135m", "h100", "smollm2.h100", env=NORM_OFF)
    greedy_pair(s, "smollm2 fp16 greedy, NormMatMulF16 vs SkipSimplifiedLayerNormalization + MatMulF16",
                  {"smollm2 fp16 norm folded": on, "smollm2 fp16 norm op": off})
    big = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100.norm", "--max-seq", "1280", env=NORM_ON)
    big_off = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", "1280", env=NORM_OFF)
    for rnd in range(2):
        for name, b in (("llama1b fp16 norm folded", big), ("llama1b fp16 norm op", big_off),
                        ("smollm2 fp16 norm folded", on), ("smollm2 fp16 norm op", off)):
            if b:
                bench(s, b, f"{name} round {rnd + 1}", "--batch", "1,16")
    if big:
        s.cli("llama1b fp16 norm folded ttft 1024", "bench", big, "--prompt-len", 1024, "--gen-len", 2, "--batch", 1,
              "--warmup", 3, "--iters", 20, "--json", "--no-verify")


def final15(s: Session) -> None:
    """Issue 8 lines 1, 2, 3, 4, 5, 6 on session 15's defaults (CachedAttention on, the norm fold off, f16_gemv loading
    its first weights before staging A): smollm2-135m fp16, then llama-1b-shape fp16 and int4 (RTN), decode at batch
    1 and 16 interleaved twice, then llama fp16's time to first token at 1,024 tokens."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    small = compile_bundle(s, "smollm2-135m", "h100", "smollm2.h100")
    if small:
        bench(s, small, "smollm2 fp16 round 1", "--batch", "1,16")
    fp16, _ = llama_fp16_int4(s, rounds=2)
    if small:
        bench(s, small, "smollm2 fp16 round 2", "--batch", "1,16")
    if fp16:
        s.cli("llama1b fp16 ttft 1024", "bench", fp16, "--prompt-len", 1024, "--gen-len", 2, "--batch", 1,
              "--warmup", 3, "--iters", 20, "--json", "--no-verify")


def build_microbench(s: Session, label: str) -> Path | None:
    """bench/kernels_microbench.cu built for sm_90 (None, recorded, where it cannot be)."""
    from leptonc.targets.kernels import _cublas_flag, _cuda_lib_dirs, find_nvcc, find_ort_include

    nvcc, include = find_nvcc(), find_ort_include()
    if nvcc is None or include is None:
        print(f"[{label}] skipped: nvcc {nvcc}, ONNX Runtime header {include}", flush=True)
        return None
    binary = WORK / "kernels_microbench"
    dirs = _cuda_lib_dirs(nvcc)
    build = subprocess.run([str(nvcc), "-O3", "-std=c++17", "-arch=sm_90", f"-I{include}", "bench/kernels_microbench.cu",
                            "-o", str(binary), *[f"-L{d}" for d in dirs], *_cublas_flag(dirs),
                            *[a for d in dirs for a in ("-Xlinker", f"-rpath={d}")]], capture_output=True, text=True,
                           timeout=300)
    if build.returncode != 0:
        print(f"[{label}] build failed: {(build.stderr or build.stdout)[-1500:]}", flush=True)
        s.record["steps"].append({"label": f"{label} build", "rc": build.returncode, "seconds": 0,
                                  "tail": (build.stderr or build.stdout)[-3000:]})
        return None
    return binary


def f16_sweep(s: Session) -> None:
    """MatMulF16's one-row kernels alone (bench/kernels_microbench.cu --f16-sweep): rows a warp group x warps along K,
    each against the shipped choice on the same weights, time and agreement."""
    binary = build_microbench(s, "f16 sweep")
    if binary is not None:
        script(s, "f16 sweep", str(binary), "--f16-sweep", out_name="f16_sweep.json", timeout=180, interpreter=None)


def next16(s: Session) -> None:
    """Issue 8 lines 1, 2 and 6 (prepared in session 15, not yet run): the one-row fp16 kernel sweep, then
    llama-1b-shape fp16 and int4 (RTN) on the shipped defaults, decode at batch 1 and 16 interleaved twice, time to
    first token at 1,024 tokens, and where batch 16's device memory goes."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    f16_sweep(s)
    fp16, _ = llama_fp16_int4(s, rounds=2)
    if fp16:
        s.cli("llama1b fp16 ttft 1024", "bench", fp16, "--prompt-len", 1024, "--gen-len", 2, "--batch", 1,
              "--warmup", 3, "--iters", 20, "--json", "--no-verify")
        # line 6: batch 16 alone in a fresh process (bench's peak also holds batch 1's block and graph)
        script(s, "memory probe llama1b b16 alone", "bench/device_memory_probe.py", str(fp16), "--batches", "16",
               out_name="memory_llama1b_b16.json", timeout=180)


PDL_ON, PDL_OFF = {"LEPTONC_PDL": "1"}, {"LEPTONC_PDL": "0"}


def pdl(s: Session) -> None:
    """Issue 8 lines 1 and 3 (prepared in session 15, not yet run): programmatic dependent launch for leptonc's decode
    kernels (targets/kernels/common.cuh), a run-time switch, so the same bundles run with it (LEPTONC_PDL=1) and
    without: 32 greedy tokens of smollm2-135m and llama-1b-shape fp16 each way, then decode at batch 1 and 16
    interleaved twice."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    small = compile_bundle(s, "smollm2-135m", "h100", "smollm2.h100")
    big = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", "1280")
    parity = {}
    for name, b in (("smollm2 fp16", small), ("llama1b fp16", big)):
        if b:
            ids = {w: greedy(s, b, f"greedy {name} pdl {w}", n=32, env=e) for w, e in (("on", PDL_ON), ("off", PDL_OFF))}
            parity[name] = {**ids, "identical": None not in ids.values() and ids["on"] == ids["off"]}
    s.record["parity"] = {"greedy, LEPTONC_PDL=1 vs 0": parity}
    s.save()
    for rnd in range(2):
        for name, b in (("smollm2 fp16", small), ("llama1b fp16", big)):
            if b:
                for w, e in (("pdl on", PDL_ON), ("pdl off", PDL_OFF)):
                    bench(s, b, f"{name} {w} round {rnd + 1}", "--batch", "1,16", env=e)


SPLIT_AUTO = {"LEPTONC_F16_SPLIT": "auto"}


def s16a(s: Session) -> None:
    """Issue 8 line 1 (session 16, first call after `pdl`): the one-row fp16 kernel sweep, then llama-1b-shape fp16
    compiled twice, as shipped and with the norm folded into the products (LEPTONC_NORM_PROLOGUE=1, so every kernel
    boundary of a layer is between leptonc's kernels), each run with the run-time switches: programmatic dependent
    launch (LEPTONC_PDL=1) and K-split one-row products (LEPTONC_F16_SPLIT=auto). 32 greedy tokens for the two
    extremes against the shipped run, then decode at batch 1 (and 16 in round 1) for every variant, interleaved."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    f16_sweep(s)
    plain = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", "1280")
    norm = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100.norm", "--max-seq", "1280",
                          env={"LEPTONC_NORM_PROLOGUE": "1"})
    both = {**PDL_ON, **SPLIT_AUTO}
    variants = [("shipped", plain, {}), ("pdl", plain, PDL_ON), ("split", plain, SPLIT_AUTO), ("pdl+split", plain, both),
                ("norm pdl+split", norm, both), ("norm pdl", norm, PDL_ON)]
    ids = {name: greedy(s, b, f"greedy llama1b {name}", n=32, env=e) for name, b, e in variants
           if b and name in ("shipped", "pdl+split", "norm pdl+split")}
    s.record["parity"] = {"greedy llama1b fp16, each against shipped": {
        **ids, "identical": {k: v is not None and v == ids.get("shipped") for k, v in ids.items()}}}
    s.save()
    for rnd in range(2):
        for name, b, e in variants:
            if b:
                bench(s, b, f"llama1b fp16 {name} round {rnd + 1}", "--batch", "1,16" if rnd == 0 else "1", env=e)


LAUNCH_BEFORE_S16 = {"LEPTONC_PDL": "0", "LEPTONC_F16_SPLIT": "0"}


def s16b(s: Session) -> None:
    """Issue 8 (session 16, the new defaults: norms folded into the fp16 products, programmatic dependent launch, the
    tuned one-row fp16 plan): llama-1b-shape fp16 (32 greedy tokens) and int4 (RTN), decode at batch 1 and 16
    interleaved twice, each fp16 round beside the same bundle launched as before session 16 (LEPTONC_PDL=0
    LEPTONC_F16_SPLIT=0); time to first token at 1,024 tokens; smollm2-135m fp16 both ways; batch 16's device
    memory alone."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    fp16 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", "1280")
    if fp16:
        s.record["greedy_llama1b_fp16"] = greedy(s, fp16, "greedy llama1b fp16", n=32)
    q4 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100.int4", "--max-seq", "1280", "--int4",
                        "--int4-method", "rtn", "--no-check")
    for rnd in range(2):
        if fp16:
            bench(s, fp16, f"llama1b fp16 round {rnd + 1}", "--batch", "1,16")
            bench(s, fp16, f"llama1b fp16 launch before s16 round {rnd + 1}", "--batch", "1", env=LAUNCH_BEFORE_S16)
        if q4:
            bench(s, q4, f"llama1b int4 round {rnd + 1}", "--batch", "1,16")
    if fp16:
        s.cli("llama1b fp16 ttft 1024", "bench", fp16, "--prompt-len", 1024, "--gen-len", 2, "--batch", 1,
              "--warmup", 3, "--iters", 20, "--json", "--no-verify")
    small = compile_bundle(s, "smollm2-135m", "h100", "smollm2.h100")
    if small:
        bench(s, small, "smollm2 fp16", "--batch", "1,16")
        bench(s, small, "smollm2 fp16 launch before s16", "--batch", "1", env=LAUNCH_BEFORE_S16)
    if fp16:
        script(s, "memory probe llama1b b16 alone", "bench/device_memory_probe.py", str(fp16), "--batches", "16",
               out_name="memory_llama1b_b16.json", timeout=120)


NBITS_NORM_ON, NBITS_NORM_OFF = {"LEPTONC_NORM_PROLOGUE_NBITS": "1"}, {"LEPTONC_NORM_PROLOGUE_NBITS": "0"}


def _norm_nbits_checked(s: Session, label: str, env: dict) -> bool:
    """NormMatMulNBitsTiled against float64 (bench/device_kernels.py --norm-nbits-only) under `env`: every case within
    2e-3 and the sum exact. The record keeps the verdict; a failure is printed."""
    data = script(s, label, "bench/device_kernels.py", "--norm-nbits-only", out_name="norm_nbits_check.json",
                  timeout=240, env=env) or {}
    rows = [r for r in data.get("check", []) if r.get("case") == "NormMatMulNBitsTiled"]
    ok = bool(rows) and all(r.get("leptonc_rel_err", 1) < 2e-3 and r.get("leptonc_sum_max_abs_err", 1) == 0 for r in rows)
    s.record["norm_nbits_check_pass"] = ok
    s.save()
    if not ok:
        print(f"NormMatMulNBitsTiled failed its check ({json.dumps(env)}): no bundle uses it in this call", flush=True)
    return ok


def s17(s: Session) -> None:
    """Issue 8 line 2 (written in session 16, not yet run): NormMatMulNBitsTiled, the residual norms folded into the
    int4 products (LEPTONC_NORM_PROLOGUE_NBITS=1 at compile), so an int4 decode layer, like the fp16 one, runs only
    leptonc's kernels and every launch overlaps the one before. First the op alone against float64
    (bench/device_kernels.py --norm-nbits-only); only if every case passes, llama-1b-shape int4 (RTN) compiled with
    the fold and without: 32 greedy tokens each, then decode at batch 1 and 16, interleaved twice (with s17b's fp16
    bundle where the machine still holds it, for line 2's ratio in one call)."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    if not _norm_nbits_checked(s, "NormMatMulNBitsTiled check", {}):
        return
    args = ("--max-seq", "1280", "--int4", "--int4-method", "rtn", "--no-check")
    folded = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100.int4.norm", *args, env=NBITS_NORM_ON)
    plain = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100.int4", *args, env=NBITS_NORM_OFF)
    greedy_pair(s, "llama1b int4, norm folded vs not", {"folded": folded, "plain": plain})
    # line 2's ratio needs fp16 in the same call: s17b's bundle where this call follows it on a still-warm machine
    fp16 = WORK / "llama1b.h100.lepton"
    variants = [("int4 norm folded", folded), ("int4 norm op", plain), ("fp16", fp16 if fp16.exists() else None)]
    print(f"[s17] fp16 bundle from an earlier call on this machine: {variants[2][1]}", flush=True)
    for rnd in range(2):
        for name, b in variants:
            if b:
                bench(s, b, f"llama1b {name} round {rnd + 1}", "--batch", "1,16")


PERSISTENT = {"LEPTONC_F16_PERSISTENT": "1"}


def s17b(s: Session) -> None:
    """Issue 8 lines 1 and 6 (written in session 16, not yet run): the one-row fp16 sweep, which now also times each
    product's shipped plan on a persistent grid (LEPTONC_F16_PERSISTENT=1: at most the resident blocks, each looping
    over row groups with A staged once); llama-1b-shape fp16 on the defaults against the same bundle with persistent
    grids (32 greedy tokens each, then decode at batch 1 and 16, three interleaved rounds); then batch 16's device
    memory alone with the default 4,096-token prefill chunks and with 1,024."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    f16_sweep(s)
    fp16 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", "1280")
    if not fp16:
        return
    greedy_env_pair(s, fp16, "llama1b", "llama1b fp16, persistent grids (changed) vs not", PERSISTENT)
    for rnd in range(3):
        for name, e in (("defaults", {}), ("persistent", PERSISTENT)):
            bench(s, fp16, f"llama1b fp16 {name} round {rnd + 1}", "--batch", "1,16" if rnd == 0 else "1", env=e)
    memory_variants(s, fp16)


# Line 6's candidates: prefill chunk tokens, the kernel library's shared buffers, its cuBLAS workspace (all run time).
LEAN = {"LEPTONC_PREFILL_TOKENS": "1024", "LEPTONC_KERNEL_BUFFER_MB": "8", "LEPTONC_CUBLAS_WORKSPACE_MB": "4"}
MEMORY_VARIANTS = [
    ("defaults", {}),
    ("chunk1024", {"LEPTONC_PREFILL_TOKENS": "1024"}),
    ("lean", LEAN),
    ("chunk512 buf4 ws1", {"LEPTONC_PREFILL_TOKENS": "512", "LEPTONC_KERNEL_BUFFER_MB": "4",
                           "LEPTONC_CUBLAS_WORKSPACE_MB": "1"}),
    ("buf8 ws4", {"LEPTONC_KERNEL_BUFFER_MB": "8", "LEPTONC_CUBLAS_WORKSPACE_MB": "4"}),
]


def memory_variants(s: Session, fp16: Path) -> None:
    """Line 6: batch 16's device memory alone (a fresh process each, with the CUDA context measured apart) for each
    of MEMORY_VARIANTS; then the lean settings against the defaults where they could cost: 32 greedy tokens,
    time to first token at 1,024 tokens (line 5) and decode at batch 1 and 16."""
    for name, env in MEMORY_VARIANTS:
        script(s, f"memory probe llama1b b16 alone, {name}", "bench/device_memory_probe.py", str(fp16),
               "--batches", "16", out_name=f"memory_llama1b_b16_{name.replace(' ', '_')}.json", timeout=120, env=env)
    greedy_env_pair(s, fp16, "llama1b", "llama1b fp16, lean memory settings (changed) vs defaults", LEAN)
    for name, env in (("defaults", {}), ("lean", LEAN)):
        s.cli(f"llama1b fp16 ttft 1024 {name}", "bench", fp16, "--prompt-len", 1024, "--gen-len", 2, "--batch", 1,
              "--warmup", 3, "--iters", 20, "--json", "--no-verify", env=env)
    bench(s, fp16, "llama1b fp16 lean round 1", "--batch", "1,16", env=LEAN)


CUBLAS_SMALL = {"CUBLAS_WORKSPACE_CONFIG": ":4096:1"}  # cuBLAS's default workspace pool: one 4 MiB buffer
BREAKDOWN_VARIANTS = [
    ("defaults", {}, ()),
    ("defaults no bare", {}, ("--no-bare",)),
    ("defaults b1", {}, ("--batch", "1")),
    ("cublas small", CUBLAS_SMALL, ()),
    ("lean", LEAN, ()),
    ("lean cublas small", {**LEAN, **CUBLAS_SMALL}, ()),
    ("minimal", {"LEPTONC_PREFILL_TOKENS": "512", "LEPTONC_KERNEL_BUFFER_MB": "4", "LEPTONC_CUBLAS_WORKSPACE_MB": "1",
                 **CUBLAS_SMALL}, ()),
]


def s17c(s: Session) -> None:
    """Issue 8 line 6 (session 17): where llama-1b-shape fp16's device memory goes, step by step
    (bench/device_memory_breakdown.py: the CUDA context, one more bare provider instance, the bundle's session, its
    K/V allocator, the first prefill's run), under each of BREAKDOWN_VARIANTS, each in a fresh process."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    fp16 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", "1280")
    if not fp16:
        return
    for name, env, extra in BREAKDOWN_VARIANTS:
        script(s, f"memory breakdown llama1b, {name}", "bench/device_memory_breakdown.py", str(fp16), *extra,
               out_name=f"memory_breakdown_{name.replace(' ', '_')}.json", timeout=120, env=env)


def s17d(s: Session) -> None:
    """Issue 8 lines 5 and 6 (session 17, after s17c): the new memory defaults (CUBLAS_WORKSPACE_CONFIG :4096:1
    where unset, 8 MiB kernel buffers) against the same with 16 and 32 MiB buffers: time to first token at 1,024
    tokens and batch 16's memory step by step (each in a fresh process), then 32 greedy tokens and decode at batch
    1 and 16; then llama-1b-shape int4's time to first token with 8 and 32 MiB buffers (its prefill dequantizes
    through them)."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    fp16 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", "1280")
    if not fp16:
        return
    variants = [("defaults", {}), ("buffers 16", {"LEPTONC_KERNEL_BUFFER_MB": "16"}),
                ("buffers 32", {"LEPTONC_KERNEL_BUFFER_MB": "32"})]
    for name, env in variants:
        s.cli(f"llama1b fp16 ttft 1024 {name}", "bench", fp16, "--prompt-len", 1024, "--gen-len", 2, "--batch", 1,
              "--warmup", 3, "--iters", 20, "--json", "--no-verify", env=env)
        script(s, f"memory breakdown llama1b, {name}", "bench/device_memory_breakdown.py", str(fp16), "--no-bare",
               out_name=f"memory_breakdown_{name.replace(' ', '_')}.json", timeout=120, env=env)
    s.record["parity"] = {"llama1b fp16 defaults (compare s17b)": greedy(s, fp16, "greedy llama1b defaults", n=32)}
    s.save()
    for name, env in (variants[0], variants[2]):
        bench(s, fp16, f"llama1b fp16 {name}", "--batch", "1,16", env=env)
    q4 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100.int4", "--max-seq", "1280", "--int4",
                        "--int4-method", "rtn", "--no-check")
    if q4:
        for name, env in (variants[0], variants[2]):
            s.cli(f"llama1b int4 ttft 1024 {name}", "bench", q4, "--prompt-len", 1024, "--gen-len", 2, "--batch", 1,
                  "--warmup", 3, "--iters", 20, "--json", "--no-verify", env=env)


def s17e(s: Session) -> None:
    """Issue 8 (session 17, last call): the committed defaults (16 MiB kernel buffers, CUBLAS_WORKSPACE_CONFIG
    :4096:1 where unset) on llama-1b-shape fp16 and int4 (RTN): time to first token at 1,024 tokens, batch 16's
    memory step by step, three interleaved rounds of decode at batch 1 and 16, and int4's time to first token with
    the default buffers and with 32 MiB."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    fp16 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", "1280")
    q4 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100.int4", "--max-seq", "1280", "--int4",
                        "--int4-method", "rtn", "--no-check")
    if fp16:
        s.cli("llama1b fp16 ttft 1024", "bench", fp16, "--prompt-len", 1024, "--gen-len", 2, "--batch", 1,
              "--warmup", 3, "--iters", 20, "--json", "--no-verify")
        script(s, "memory breakdown llama1b b16", "bench/device_memory_breakdown.py", str(fp16), "--no-bare",
               out_name="memory_breakdown_b16.json", timeout=120)
    for rnd in range(3):
        for name, b in (("llama1b fp16", fp16), ("llama1b int4", q4)):
            if b:
                bench(s, b, f"{name} round {rnd + 1}", "--batch", "1,16")
    if q4:
        for name, env in (("defaults", {}), ("buffers 32", {"LEPTONC_KERNEL_BUFFER_MB": "32"})):
            s.cli(f"llama1b int4 ttft 1024 {name}", "bench", q4, "--prompt-len", 1024, "--gen-len", 2, "--batch", 1,
                  "--warmup", 3, "--iters", 20, "--json", "--no-verify", env=env)


DIRECT_A = {"LEPTONC_NBITS_DIRECT_A": "1"}


def _forced_path_check(s: Session) -> tuple[Path | None, dict]:
    """The microbench built (None where it cannot be) and bench/kernels_check.py's JSON: every decode kernel forced
    on every case against float64."""
    binary = build_microbench(s, "nbits microbench")
    if binary is None:
        return None, {}
    return binary, script(s, "nbits forced-path check", "bench/kernels_check.py", str(binary),
                          out_name="kernels_check.json", timeout=360) or {}


def s18(s: Session) -> None:
    """Issue 8 line 2 (written in session 17, not yet run): one-row int4/int8 products that read A per warp from
    global memory instead of staging the whole row in every block (LEPTONC_NBITS_DIRECT_A=1 at run time,
    tiled_gemv's DIRECT instances). First every decode kernel forced on every case against float64
    (bench/kernels_check.py, now with `gemv-direct` at one row) and the products' times with and without it
    (bench/kernels_microbench.cu, variant "gemv direct-a"); only if every check passes, llama-1b-shape int4 (RTN)
    and fp16: 32 greedy int4 tokens each way, then decode at batch 1 and 16 for int4, int4 direct and fp16,
    interleaved three times. HISTORICAL: run once in session 18 (5% slower at batch 1); the DIRECT instances and the
    switch were removed afterwards, so this mode no longer measures anything."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    binary, data = _forced_path_check(s)
    if binary is None:
        return
    ok = bool(data.get("check_ok")) and any(r.get("variant") == "gemv-direct" for r in data.get("rows", []))
    s.record["nbits_check_pass"] = ok
    s.save()
    script(s, "nbits microbench", str(binary), out_name="nbits_microbench.json", timeout=180, interpreter=None)
    if not ok:
        print("the forced-path check failed: no bundle runs with LEPTONC_NBITS_DIRECT_A=1 in this call", flush=True)
        return
    q4 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100.int4", "--max-seq", "1280", "--int4",
                        "--int4-method", "rtn", "--no-check")
    if not q4:
        return
    greedy_env_pair(s, q4, "llama1b int4", "llama1b int4, LEPTONC_NBITS_DIRECT_A=1 (changed) vs not", DIRECT_A)
    fp16 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", "1280")
    for rnd in range(3):
        for name, b, e in (("int4", q4, {}), ("int4 direct", q4, DIRECT_A), ("fp16", fp16, {})):
            if b:
                bench(s, b, f"llama1b {name} round {rnd + 1}", "--batch", "1,16", env=e)


def s18b(s: Session) -> None:
    """Issue 8 lines 1 and 2: where a batch-1 decode step's time goes as it actually runs (bench/device_timeline.py:
    CUPTI through PyTorch's profiler, so the gaps between kernels and PDL's overlap are seen), llama-1b-shape fp16
    and int4 (RTN) as shipped; then decode at batch 1 and 16, the two interleaved twice."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    fp16 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", "1280")
    q4 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100.int4", "--max-seq", "1280", "--int4",
                        "--int4-method", "rtn", "--no-check")
    for name, b in (("fp16", fp16), ("int4", q4)):
        if b:
            script(s, f"timeline llama1b {name}", "bench/device_timeline.py", str(b),
                   out_name=f"timeline_llama1b_{name}.json", timeout=120)
    for rnd in range(2):
        for name, b in (("fp16", fp16), ("int4", q4)):
            if b:
                bench(s, b, f"llama1b {name} round {rnd + 1}", "--batch", "1,16")


PIPELINE_OFF = {"LEPTONC_PIPELINE": "0"}


def _pipeline_rounds(s: Session, bundles: dict, rounds: int) -> None:
    for rnd in range(rounds):
        for name, b in bundles.items():
            for mode, e in (("pipelined", {}), ("one step at a time", PIPELINE_OFF)):
                if b and b.exists():
                    bench(s, b, f"llama1b {name} {mode} round {rnd + 1}", "--batch", "1,16", env=e)


def s18c(s: Session) -> None:
    """Issue 8 lines 1 and 2: the pipelined greedy decode (OrtCudaRunner.greedy_tokens: ONNX Runtime on a stream of
    ours, steps queued on the device ahead of the host). llama-1b-shape fp16 and int4 (RTN): 32 greedy tokens with
    the pipeline and without (LEPTONC_PIPELINE=0), which must be identical; then decode at batch 1 and 16, each
    bundle with and without, interleaved, as the budget allows (s18d repeats the rounds on the same bundles)."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    q4, fp16 = _llama_int4_fp16(s)
    for name, b in (("fp16", fp16), ("int4", q4)):
        if b:
            greedy_env_pair(s, b, f"llama1b {name}", f"llama1b {name}, LEPTONC_PIPELINE=0 (changed) vs not",
                            PIPELINE_OFF)
    _pipeline_rounds(s, {"fp16": fp16, "int4": q4}, 2)


def s18d(s: Session) -> None:
    """s18c's decode rounds again, on the bundles s18c left in the work directory (the machine still warm)."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    _pipeline_rounds(s, {"fp16": WORK / "llama1b.h100.lepton", "int4": WORK / "llama1b.h100.int4.lepton"}, 2)


NBITS_NORM_KERNEL = {"LEPTONC_NBITS_NORM_KERNEL": "1"}
# 32 greedy tokens of llama-1b-shape int4 (RTN, norms not folded) in session 18's s18c, with and without the pipeline
S18C_INT4_TOKENS = [3945, 24809, 40813, 38721, 95012, 78501, 61493, 54957, 25890, 91558, 73588, 81771, 123073, 120750,
                    27370, 75743, 91988, 97775, 79544, 61962, 79388, 33401, 7768, 63586, 40116, 80641, 31718, 40049,
                    39744, 29188, 31344, 100617]


def s18e(s: Session) -> None:
    """Issue 8 line 2: the int4 graph's residual norms as leptonc kernels of their own under PDL. The bundle is
    compiled with the norms folded (LEPTONC_NORM_PROLOGUE_NBITS=1: NormMatMulNBitsTiled) and run with
    LEPTONC_NBITS_NORM_KERNEL=1, so one row goes through skip_rms_norm_rows (now PDL-launched) and then the product,
    instead of every block of the product normalizing the row in its prologue (session 17: slower). First the op
    against float64 with the switch on; only if it passes: the folded int4 bundle and fp16, 32 greedy tokens with
    the switch (compared with s18c's plain int4 tokens), then decode at batch 1 and 16: int4 with the switch, int4
    with the prologue, fp16, interleaved twice. HISTORICAL: run once in session 18 (+0.5% over the prologue, no
    better than the unfolded default); the switch was removed afterwards (skip_rms_norm_rows keeps its PDL launch)."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    if not _norm_nbits_checked(s, "NormMatMulNBitsTiled check, norm kernel", NBITS_NORM_KERNEL):
        return
    folded = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100.int4.norm", "--max-seq", "1280", "--int4",
                            "--int4-method", "rtn", "--no-check", env=NBITS_NORM_ON)
    fp16 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", "1280")
    if folded:
        ids = greedy(s, folded, "greedy llama1b int4 norm kernel", n=32, env=NBITS_NORM_KERNEL)
        s.record["parity"] = {"int4 norm kernel vs s18c plain int4": {
            "norm_kernel": ids, "s18c_plain": S18C_INT4_TOKENS, "identical": ids == S18C_INT4_TOKENS}}
        s.save()
    for rnd in range(2):
        for name, b, e in (("int4 norm kernel", folded, NBITS_NORM_KERNEL), ("int4 norm prologue", folded, {}),
                           ("fp16", fp16, {})):
            if b:
                bench(s, b, f"llama1b {name} round {rnd + 1}", "--batch", "1,16", env=e)


def s18f(s: Session) -> None:
    """Issue 8 lines 3-7 with the pipelined greedy decode (the default since session 18): smollm2 fp16 at batch 1
    and 16 against Hugging Face in one `leptonc bench --baseline hf` run, and without the pipeline; llama-1b-shape
    fp16: time to first token at 1,024 tokens, batch 16's device memory alone, and batch 1 against Hugging Face."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    small = compile_bundle(s, "smollm2-135m", "h100", "smollm2.h100")
    if small:
        bench(s, small, "smollm2 fp16 vs hf", "--batch", "1,16", "--baseline", "hf")
        bench(s, small, "smollm2 fp16 one step at a time", "--batch", "1,16", env=PIPELINE_OFF)
    fp16 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", "1280")
    if fp16:
        s.cli("llama1b fp16 ttft 1024", "bench", fp16, "--prompt-len", 1024, "--gen-len", 2, "--batch", 1,
              "--warmup", 3, "--iters", 20, "--json", "--no-verify")
        script(s, "memory probe llama1b b16 alone", "bench/device_memory_probe.py", str(fp16), "--batches", "16",
               out_name="memory_llama1b_b16.json", timeout=120)
        bench(s, fp16, "llama1b fp16 vs hf", "--batch", "1", "--baseline", "hf")


def s18g(s: Session) -> None:
    """Issue 8 line 2: the streaming int4/int8 kernel (tiled_stream: llama-1b-shape's o product at batch 1, every
    product of a few rows) launched with programmatic dependent launch, its weights loaded before it waits for the
    kernel before (session 18's timeline: o was the one product of the int4 layer with no overlap). First every
    decode kernel forced on every case against float64 (bench/kernels_check.py); only if that passes: llama-1b-shape
    int4 (RTN) and fp16, 32 greedy int4 tokens (PDL does not change the arithmetic: they must equal s18c's), decode at
    batch 1 and 16 interleaved twice, and the int4 step's timeline."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    binary, data = _forced_path_check(s)
    if binary is None:
        return
    s.record["check_pass"] = ok = bool(data.get("check_ok"))
    s.save()
    if not ok:
        print("the forced-path check failed: no bundle runs in this call", flush=True)
        return
    q4, fp16 = _llama_int4_fp16(s)
    if q4:
        ids = greedy(s, q4, "greedy llama1b int4", n=32)
        s.record["parity"] = {"int4 vs s18c int4": {"now": ids, "s18c": S18C_INT4_TOKENS,
                                                    "identical": ids == S18C_INT4_TOKENS}}
        s.save()
    for rnd in range(2):
        for name, b in (("int4", q4), ("fp16", fp16)):
            if b:
                bench(s, b, f"llama1b {name} round {rnd + 1}", "--batch", "1,16")
    if q4:
        script(s, "timeline llama1b int4", "bench/device_timeline.py", str(q4), out_name="timeline_llama1b_int4.json",
               timeout=60)


ATTN_PREFETCH_V = {"LEPTONC_ATTN_PREFETCH_V": "1"}


def s19a(s: Session) -> None:
    """Issue 8 line 2 (written in session 18, not yet run): decode_attention's value prefetch
    (LEPTONC_ATTN_PREFETCH_V=1 at run time: the first 16 value rows of a warp's chunk load with its keys). The
    attention is about 130 us of either llama step (session 18's timeline), and line 2 needs about 38 us less in
    what fp16 and int4 share. First the kernels and the op against float64 with the switch
    (bench/device_attention_check.py); only if both pass: llama-1b-shape int4 (RTN) and fp16, 32 greedy tokens
    each with the switch and without (the sums run in the same order: they must be identical), then decode at
    batch 1 and 16, each bundle both ways, interleaved twice. HISTORICAL: never run as such; s19d measured the switch,
    and it is now the default, so both sides of this comparison run it."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    if not _attention_checked(s, ATTN_PREFETCH_V):
        return
    q4, fp16 = _llama_int4_fp16(s)
    for name, b in (("int4", q4), ("fp16", fp16)):
        if b:
            greedy_env_pair(s, b, f"llama1b {name}", f"llama1b {name}, LEPTONC_ATTN_PREFETCH_V=1 (changed) vs not",
                            ATTN_PREFETCH_V)
    for rnd in range(2):
        for name, b in (("int4", q4), ("fp16", fp16)):
            for mode, e in (("prefetch", ATTN_PREFETCH_V), ("shipped", {})):
                if b:
                    bench(s, b, f"llama1b {name} {mode} round {rnd + 1}", "--batch", "1,16", env=e)


def s19b(s: Session) -> None:
    """Issue 8 line 2: the decode attention prefetches the weights of the products after it into L2
    (LEPTONC_L2_PREFETCH_MB at run time; the bundles carry the weights as the attention's extra inputs). The attention
    is a latency chain of about 8 us a layer during which HBM is nearly idle (session 18's timeline), and the int4
    layer's o and gate|up (19 MiB) fit in the H100's 50 MiB L2. llama-1b-shape int4 (RTN) first: 32 greedy tokens
    with 24 MiB and without (prefetches change no arithmetic: they must be identical), decode at batch 1 and 16 with
    and without; then fp16 the same; then the int4 variants (late issue, per-line prefetch, 40 MiB) while the call's
    budget lasts. HISTORICAL: run once in session 19 (every variant slower: int4 1,354 -> 1,268 at 24 MiB); the
    prefetch and the attention's extra inputs were removed afterwards, so this mode no longer measures anything."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    on = {"LEPTONC_L2_PREFETCH_MB": "24"}
    q4 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100.int4", "--max-seq", "1280", "--int4",
                        "--int4-method", "rtn", "--no-check")
    if q4:
        greedy_env_pair(s, q4, "llama1b int4", "llama1b int4, LEPTONC_L2_PREFETCH_MB=24 (changed) vs not", on)
        for mode, e in (("off", {}), ("l2 24", on)):
            bench(s, q4, f"llama1b int4 {mode}", "--batch", "1,16", env=e)
    fp16 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", "1280")
    if fp16:
        for mode, e in (("off", {}), ("l2 24", on)):
            bench(s, fp16, f"llama1b fp16 {mode}", "--batch", "1,16", env=e)
    if q4:
        for mode, e in (("l2 24 late", {**on, "LEPTONC_L2_PREFETCH_AT": "late"}),
                        ("l2 24 line", {**on, "LEPTONC_L2_PREFETCH_MODE": "line"}),
                        ("l2 40", {"LEPTONC_L2_PREFETCH_MB": "40"}), ("off again", {})):
            bench(s, q4, f"llama1b int4 {mode}", "--batch", "1,16", env=e)


def s19c(s: Session) -> None:
    """Issue 8 line 2: tiled_gemv's rolling window (a warp holds PD of its S steps' weights in registers and refills
    each slot with the step PD ahead as it uses it, instead of loading all S first). Session 18's timeline puts the
    int4 gate|up at 13.4 us for 17.4 MB (1.3 TB/s) and down at 8.9 us for 8.7 MB: the one-row int4 products stream at
    half the bandwidth the fp16 ones reach. Every decode kernel forced on every case against float64
    (bench/kernels_check.py, then with gemv:8:4, gemv:16:4 and gemv:16:8), then each product's time with every plan
    (bench/kernels_microbench.cu, variants "gemv sS pdPD [tbTB]"). The 16-step instances were removed
    afterwards (slower on every product), so only the 8:4 rows can be run again."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    binary, data = _forced_path_check(s)
    if binary is None:
        return
    s.record["nbits_check_pass"] = bool(data.get("check_ok"))
    s.save()
    script(s, "nbits microbench", str(binary), out_name="nbits_microbench.json", timeout=240, interpreter=None)


def s19d(s: Session) -> None:
    """Issue 8 line 2: llama-1b-shape int4 (RTN) with the gate|up products (SwiGLU epilogue) on tiled_gemv's rolling
    window (LEPTONC_GEMV_WINDOW=8:4 at run time; s19c's microbench: 9.30 us against 10.10): 32 greedy tokens with
    and without (the sums run in the same order: identical), decode at batch 1 and 16 both ways, fp16 for the ratio;
    then session 18's attention value prefetch (LEPTONC_ATTN_PREFETCH_V=1, never run before): its check, and only if
    it passes int4 (with the window) and fp16 with it; then the window and the default once more. HISTORICAL: run once
    in session 19; both are now the defaults, so its "default" rows no longer run without them."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    window = {"LEPTONC_GEMV_WINDOW": "8:4"}
    q4 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100.int4", "--max-seq", "1280", "--int4",
                        "--int4-method", "rtn", "--no-check")
    if not q4:
        return
    greedy_env_pair(s, q4, "llama1b int4", "llama1b int4, LEPTONC_GEMV_WINDOW=8:4 (changed) vs not", window)
    bench(s, q4, "llama1b int4 default", "--batch", "1,16")
    bench(s, q4, "llama1b int4 window 8:4", "--batch", "1,16", env=window)
    fp16 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", "1280")
    if fp16:
        bench(s, fp16, "llama1b fp16", "--batch", "1,16")
    if _attention_checked(s, ATTN_PREFETCH_V):
        bench(s, q4, "llama1b int4 window 8:4 + value prefetch", "--batch", "1,16", env={**window, **ATTN_PREFETCH_V})
        if fp16:
            bench(s, fp16, "llama1b fp16 value prefetch", "--batch", "1,16", env=ATTN_PREFETCH_V)
    bench(s, q4, "llama1b int4 window 8:4 again", "--batch", "1,16", env=window)
    bench(s, q4, "llama1b int4 default again", "--batch", "1,16")


def s19f(s: Session) -> None:
    """Issue 8 line 2, with s19d's two gains now the defaults (the int4 gate|up window 8:4, the attention's value
    prefetch): the decode attention asking L2 for its split's key and value rows ahead (LEPTONC_ATTN_KV_PREFETCH=1
    once it knows its keys, 2 before its dependency wait). The attention check with 2, 32 greedy int4 tokens with 2
    and without (a prefetch changes no arithmetic: identical), then llama-1b-shape int4 and fp16 at batch 1 each way,
    interleaved twice. HISTORICAL: run once in session 19; mode 2 is now the default."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    kv1, kv2 = {"LEPTONC_ATTN_KV_PREFETCH": "1"}, {"LEPTONC_ATTN_KV_PREFETCH": "2"}
    q4 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100.int4", "--max-seq", "1280", "--int4",
                        "--int4-method", "rtn", "--no-check")
    if not q4 or not _attention_checked(s, kv2):
        return
    greedy_env_pair(s, q4, "llama1b int4", "llama1b int4, LEPTONC_ATTN_KV_PREFETCH=2 (changed) vs not", kv2)
    fp16 = compile_bundle(s, "llama-1b-shape", "h100", "llama1b.h100", "--max-seq", "1280")
    bench(s, q4, "llama1b int4 default", "--batch", "1,16")
    bench(s, q4, "llama1b int4 kv prefetch 2", "--batch", "1", env=kv2)
    if fp16:
        bench(s, fp16, "llama1b fp16 default", "--batch", "1,16")
        bench(s, fp16, "llama1b fp16 kv prefetch 2", "--batch", "1", env=kv2)
    bench(s, q4, "llama1b int4 kv prefetch 1", "--batch", "1", env=kv1)
    for name, b, e in (("int4 kv prefetch 2", q4, kv2), ("fp16 kv prefetch 2", fp16, kv2), ("int4 default", q4, {}),
                       ("fp16 default", fp16, {})):
        if b:
            bench(s, b, f"llama1b {name} again", "--batch", "1", env=e)


def _int4_parity(s: Session, q4: Path | None, label: str = "greedy llama1b int4") -> None:
    """32 greedy tokens of the llama-1b-shape int4 bundle against session 18's (S18C_INT4_TOKENS), into the record."""
    if q4:
        ids = greedy(s, q4, label, n=32)
        s.record.setdefault("parity", {})["llama1b int4 vs session 18"] = {
            "tokens": ids, "identical": ids == S18C_INT4_TOKENS}
        s.save()


def s19g(s: Session) -> None:
    """Issue 8 at the end of session 19, everything at its defaults (the int4 gate|up window 8:4, the attention's value
    prefetch, its key/value-row prefetch before the dependency wait): llama-1b-shape int4 (RTN) and fp16; 32 greedy
    int4 tokens against session 18's (S18C_INT4_TOKENS: the changes alter no arithmetic); decode at batch 1 and 16 for
    both, then batch 1 again for both; then smollm2-135m fp16 at batch 1 and 16 against Hugging Face in the same run."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    q4, fp16 = _llama_int4_fp16(s)
    _int4_parity(s, q4)
    for rnd, batches in ((1, "1,16"), (2, "1")):
        for name, b in (("int4", q4), ("fp16", fp16)):
            if b:
                bench(s, b, f"llama1b {name} round {rnd}", "--batch", batches)
    small = compile_bundle(s, "smollm2-135m", "h100", "smollm2.h100")
    if small:
        bench(s, small, "smollm2 fp16 vs hf", "--batch", "1,16", "--baseline", "hf")


def s20a(s: Session) -> None:
    """Issue 8 line 2: the int4 decode layer's two residual norms folded into the products again
    (LEPTONC_NORM_PROLOGUE_NBITS=1 at compile: NormMatMulNBitsTiled, the norm as the few-rows kernel's prologue, now
    with the gate|up rolling window too). Session 17 measured it slower, but then the o product before gate|up
    (tiled_stream) had no PDL, so gate|up could not overlap it; session 19's timeline shows the int4 products behind
    ONNX Runtime's norm overlapping nothing (-0.2 us) where fp16's overlap 10-13 us. First the op against float64;
    only if it passes: int4 folded, int4 as shipped and fp16 compiled at once; 32 greedy tokens of the folded bundle;
    the timeline of both int4 bundles; then decode at batch 1 for the three, interleaved twice, and batch 16 once."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    if not _norm_nbits_checked(s, "NormMatMulNBitsTiled check", {}):
        return
    q4 = ("--max-seq", "1280", "--int4", "--int4-method", "rtn", "--no-check")
    folded, plain, fp16 = compile_parallel(s, [
        ("llama-1b-shape", "h100", "llama1b.h100.int4.norm", q4, NBITS_NORM_ON),
        ("llama-1b-shape", "h100", "llama1b.h100.int4", q4, NBITS_NORM_OFF),
        ("llama-1b-shape", "h100", "llama1b.h100", ("--max-seq", "1280"), None)])
    if folded:
        ids = greedy(s, folded, "greedy llama1b int4 folded", n=32)
        s.record.setdefault("parity", {})["llama1b int4 folded vs session 18 plain"] = {
            "tokens": ids, "identical": ids == S18C_INT4_TOKENS}
        s.save()
    for name, b in (("int4_norm", folded), ("int4", plain)):
        if b:
            script(s, f"timeline llama1b {name}", "bench/device_timeline.py", str(b),
                   out_name=f"timeline_llama1b_{name}.json", timeout=120)
    variants = (("int4 folded", folded), ("int4", plain), ("fp16", fp16))
    for rnd, batches in ((1, "1"), (2, "1"), (3, "1,16")):
        for name, b in variants:
            if b:
                bench(s, b, f"llama1b {name} round {rnd}", "--batch", batches)


def s20c(s: Session) -> None:
    """Issue 8 line 2, the checks before session 20's bundles run: every decode kernel forced on every case against
    float64 (bench/kernels_check.py, now with the int8 weights' scales-only layout, `symmetric` 1), the folded norm
    op (bench/device_kernels.py --norm-nbits-only, its int8 head case in that layout too), the two ends of the step
    (bench/device_step_ends_check.py: MaskLengths and LogitsArgMax against numpy and ONNX Runtime's ops), then the
    microbench's product times (the int8 head reads 8 MiB less)."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    binary, data = _forced_path_check(s)
    s.record["nbits_check_pass"] = bool(data.get("check_ok"))
    s.save()
    _norm_nbits_checked(s, "NormMatMulNBitsTiled check", {})
    ends = script(s, "step ends check", "bench/device_step_ends_check.py", out_name="step_ends_check.json",
                  timeout=240) or {}
    s.record["step_ends_check_pass"] = bool(ends.get("all_pass"))
    s.save()
    if binary:
        script(s, "nbits microbench", str(binary), out_name="nbits_microbench.json", timeout=180, interpreter=None)
    print("checks:", json.dumps({k: s.record.get(k) for k in ("nbits_check_pass", "norm_nbits_check_pass",
                                                               "step_ends_check_pass")}), flush=True)


def s20d(s: Session) -> None:
    """Issue 8 at session 20's defaults (run after s20c's checks pass): the int4 norms folded, MaskLengths and
    LogitsArgMax at the step's ends, the int8 head's scales alone. llama-1b-shape int4 (RTN) and fp16; 32 greedy
    int4 tokens against session 18's (none of these changes alters arithmetic); decode at batch 1 for both,
    interleaved twice, then batch 1 and 16 once more."""
    os.environ["LEPTONC_CUDA_KERNELS"] = "1"
    q4, fp16 = _llama_int4_fp16(s)
    _int4_parity(s, q4)
    for rnd, batches in ((1, "1"), (2, "1"), (3, "1,16")):
        for name, b in (("int4", q4), ("fp16", fp16)):
            if b:
                bench(s, b, f"llama1b {name} round {rnd}", "--batch", batches)


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
        if isinstance(data, dict) and data.get("runner"):
            line += f" | {data['runner'].get('kv_layout')}, graph {str(data['runner'].get('cuda_graph'))[:40]}"
        print(line)
    if "parity" in s.record:
        print("parity:", json.dumps(s.record["parity"]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("session", choices=("runtime", "decode_small", "decode_big", "decode_int4", "decode_final",
                                            "graph_probe", "cuda_graph", "cuda_graph_big", "fpa_memory", "attn_memory", "kv_block", "kv_exact", "gemv", "kernels", "kernels_llama",
                                            "int4_accuracy", "int4_awq_speed", "greedy", "fp16_swiglu", "confirm", "f16_gemv", "ttft_hf", "kernel_times",
                                            "attention", "attention_llama", "norm", "final15", "next16", "pdl", "s16a", "s16b", "s17", "s17b", "s17c", "s17d", "s17e", "s18", "s18b", "s18c", "s18d", "s18e", "s18f", "s18g", "s19a", "s19b", "s19c", "s19d", "s19f", "s19g", "s20a", "s20c", "s20d"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    ap.add_argument("--budget", type=float, default=540, help="seconds for all steps (the call's limit is 600)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    s = Session(args.out, args.session, args.budget)
    print(json.dumps(s.record["machine"]), flush=True)
    try:
        {"runtime": runtime_session, "decode_small": decode_small, "decode_big": decode_big,
         "decode_int4": decode_int4, "decode_final": decode_final, "graph_probe": graph_probe,
         "cuda_graph": cuda_graph, "cuda_graph_big": cuda_graph_big, "fpa_memory": fpa_memory,
         "attn_memory": attn_memory, "kv_block": kv_block,
         "kv_exact": kv_exact, "gemv": gemv, "kernels": kernels, "kernels_llama": kernels_llama,
         "int4_accuracy": int4_accuracy, "int4_awq_speed": int4_awq_speed,
         "greedy": greedy_device, "fp16_swiglu": fp16_swiglu, "confirm": confirm,
         "f16_gemv": f16_gemv, "ttft_hf": ttft_hf, "kernel_times": kernel_times,
         "attention": attention, "attention_llama": attention_llama, "norm": norm, "final15": final15, "next16": next16, "pdl": pdl, "s16a": s16a, "s16b": s16b, "s17": s17, "s17b": s17b, "s17c": s17c, "s17d": s17d, "s17e": s17e, "s18": s18, "s18b": s18b, "s18c": s18c, "s18d": s18d, "s18e": s18e, "s18f": s18f, "s18g": s18g, "s19a": s19a, "s19b": s19b, "s19c": s19c, "s19d": s19d, "s19f": s19f, "s19g": s19g, "s20a": s20a, "s20c": s20c, "s20d": s20d}[args.session](s)
    finally:
        s.save()
        summary(s)


if __name__ == "__main__":
    main()
