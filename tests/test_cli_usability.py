"""The CLI as a new user meets it: user text printed as text, exit codes as documented, progress in logs,
readable help, the bench floor of the device it ran on, the accuracy gate said up front and its failed report kept."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from typing import NamedTuple

import pytest

from conftest import ROOT, assert_clean_error, run_cli

COMMANDS = ("targets", "compile", "run", "bench", "eval", "inspect", "package")


class Result(NamedTuple):
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def _invoke(*args: str) -> Result:
    """`leptonc ARGS` in this process, through the entry point (user errors become exit codes there)."""
    from leptonc.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
    return Result(code, stdout.getvalue(), stderr.getvalue())


# ---- user text is text ---------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", ["[/] x", "print x[i] and [bold]y[/bold] :smile:"])
def test_prompts_with_markup_characters_are_echoed_verbatim(tiny_bundle, prompt):
    proc = run_cli("run", tiny_bundle, "-p", prompt, "-n", 2)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(prompt), proc.stdout


def test_a_source_path_with_markup_characters_is_a_clean_model_source_error(tmp_path):
    weird = tmp_path / "weird[/]dir"
    proc = run_cli("compile", weird, "-o", tmp_path / "x.lepton")
    assert_clean_error(proc, 3)
    assert "weird[/]dir" in proc.stderr


# ---- the request is checked before anything is echoed; exit codes as README's table -----------

def test_prompt_is_not_echoed_before_the_request_is_checked(tiny_bundle):
    proc = run_cli("run", tiny_bundle, "-p", "hello there", "-n", 2100)
    assert_clean_error(proc, 8)
    assert "hello there" not in proc.stdout


@pytest.mark.parametrize("argv", [
    ["run", "B", "-p", "hi", "-n", "-1"], ["run", "B", "-p", "hi", "--temperature", "-1"],
    ["run", "B", "-p", "hi", "--top-p", "2"], ["run", "B", "-p", "hi", "--device", "tpu"],
    ["bench", "B", "--batch", "0"], ["bench", "B", "--iters", "0"], ["bench", "B", "--baseline", "vllm"],
    ["serve", "B", "--switch-interval-ms", "5000"], ["serve", "B", "--switch-interval-ms", "-1"],
    ["serve", "B", "--stream-interval", "0"],
])
def test_out_of_range_options_exit_2(tiny_bundle, argv):
    res = _invoke(*[str(tiny_bundle) if a == "B" else a for a in argv])
    assert res.exit_code == 2, res.output


def test_inspect_of_a_missing_bundle_exits_7_as_run_and_bench_do(tmp_path):
    assert _invoke("inspect", tmp_path / "none.lepton").exit_code == 7


def test_eval_of_a_missing_or_broken_bundle_is_a_bundle_error_not_a_model_source_error(tmp_path):
    """eval takes a bundle or a model source; a path named .lepton is a bundle: exit 7 with the bundle's next step."""
    broken = tmp_path / "broken.lepton"
    broken.mkdir()  # no manifest.json
    data = tmp_path / "text.txt"
    data.write_text("some text")
    for path in (tmp_path / "none.lepton", broken):
        res = _invoke("eval", path, "--data", data)
        assert res.exit_code == 7 and "model source" not in res.output, res.output


@pytest.mark.parametrize("flag, value", [("--port", "-1"), ("--port", "70000"), ("--max-queue", "-1"),
                                         ("--grace", "-5"), ("--max-body-kb", "0"), ("--prefill-chunk", "0")])
def test_serve_names_an_out_of_range_flag_before_loading_anything(tmp_path, flag, value):
    res = _invoke("serve", tmp_path / "none.lepton", flag, value)  # the range is checked before the bundle is read
    assert res.exit_code == 2 and f"Invalid value for '{flag}'" in res.output, res.output
    assert "Traceback" not in res.output


def test_whitespace_prompt_is_refused(tiny_bundle):
    proc = run_cli("run", tiny_bundle, "-p", "   ")
    assert_clean_error(proc, 8)
    assert "whitespace" in proc.stderr


def test_device_cuda_on_a_cpu_bundle_does_not_suggest_compiling_for_cpu(tiny_bundle):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    proc = run_cli("run", tiny_bundle, "-p", "hi", "--device", "cuda")
    assert_clean_error(proc, 5)
    assert "--target cpu" not in proc.stderr and "drop --device cuda" in proc.stderr


# ---- inspect, bench --------------------------------------------------------------------------------

def test_inspect_prints_a_table_and_json_only_with_json(tiny_bundle):
    table = _invoke("inspect", tiny_bundle)
    assert table.exit_code == 0, table.output
    assert "tiny-llama" in table.stdout and "onnxruntime" in table.stdout and not table.stdout.lstrip().startswith("{")
    data = json.loads(_invoke("inspect", tiny_bundle, "--json").stdout)
    assert data["backend"] == "onnxruntime"


def test_bench_floor_comes_from_the_device_it_ran_on(tiny_bundle):
    from leptonc.runtime.bench import H100_COPY_BANDWIDTH, device_bandwidth

    assert device_bandwidth("cpu: Intel(R) Xeon(R) (2 threads)") is None
    assert device_bandwidth("NVIDIA H100 80GB HBM3") == H100_COPY_BANDWIDTH
    assert device_bandwidth("NVIDIA A10G") is None  # not measured: no floor unless --bandwidth
    args = ("bench", tiny_bundle, "--prompt-len", 4, "--gen-len", 4, "--warmup", 0, "--iters", 1)
    on_cpu = _invoke(*args)
    assert on_cpu.exit_code == 0, on_cpu.output
    assert "memory floor" not in on_cpu.stdout and "of floor" not in on_cpu.stdout
    given = json.loads(_invoke(*args, "--bandwidth", "1e11", "--json").stdout)
    assert given["floor_bandwidth_bytes_per_s"] == 1e11 and "memory_floor" in given["results"][0]


# ---- progress and tables in a log --------------------------------------------------------------------

def test_steps_print_plain_throttled_lines_when_not_a_terminal(monkeypatch):
    from rich.console import Console

    from leptonc.progress import LogLines, Steps

    def lines_of(every_s: float) -> list[str]:
        monkeypatch.setattr(LogLines, "EVERY_S", every_s)
        log = io.StringIO()
        steps = Steps(console=Console(file=log, force_terminal=False, width=200))
        with steps.step("calibrate", "Calibrating"):
            steps.update("sequence 1/16")
            steps.update("sequence 2/16")
        return log.getvalue().splitlines()

    unthrottled = lines_of(0.0)
    assert re.fullmatch(r"\[ +\d+\.\ds\] Calibrating: started", unthrottled[0]), unthrottled
    assert unthrottled[1].endswith("Calibrating: sequence 1/16") and unthrottled[2].endswith("sequence 2/16")
    assert re.search(r"Calibrating: done in \d+\.\ds$", unthrottled[3]) and len(unthrottled) == 4
    throttled = lines_of(60.0)  # updates within a minute of the last line are not printed; the step ends are
    assert len(throttled) == 2 and throttled[1].endswith("s") and "done in" in throttled[1], throttled


def test_targets_table_is_not_cut_in_a_pipe():
    proc = run_cli("targets")
    assert proc.returncode == 0
    assert "onnxruntime" in proc.stdout and "…" not in proc.stdout
    assert "NVIDIA H100 SXM 80GB (Hopper)" in proc.stdout


def test_compile_in_a_log_shows_progress_lines_and_no_future_warning(tmp_path):
    proc = run_cli("compile", "tiny-llama", "-o", tmp_path / "t.lepton")  # with the check against PyTorch
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^\[ +\d+\.\ds\] .*: started$", proc.stderr, re.M), proc.stderr
    assert "FutureWarning" not in proc.stderr and "past_key_values" not in proc.stderr


# ---- help -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ("", *COMMANDS))
def test_help_reads_cleanly(command):
    res = _invoke(*([command] if command else []), "-h")
    assert res.exit_code == 0, res.output
    for defect in ("%%", "<bool>", "<str>", "<int>", "<float>"):
        assert defect not in res.stdout, (command, defect)


def test_no_verify_has_one_meaning():
    assert "--no-parity" in _invoke("compile", "-h").stdout and "--no-verify" not in _invoke("compile", "-h").stdout
    for command in ("run", "bench", "eval", "inspect"):
        assert "bundle checks" in _invoke(command, "-h").stdout, command


def test_dry_run_prints_no_raw_json_and_no_empty_compute_capability():
    cpu = _invoke("compile", "tiny-llama", "--dry-run")
    assert "(-)" not in cpu.stdout
    trt = _invoke("compile", "tiny-llama", "--target", "h100", "--backend", "tensorrt", "--dry-run")
    assert trt.exit_code == 0, trt.output
    assert not re.search(r"^\s*[{}\[\]],?$", trt.stdout, re.M) and "strongly_typed True" in trt.stdout


# ---- the accuracy gate -----------------------------------------------------------------------------

def test_gate_default_depends_on_precision_and_is_said_up_front():
    from leptonc.calibration.quantize import QuantSettings

    assert QuantSettings(precision="int4").max_ppl_increase == 15.0
    assert QuantSettings(precision="int8").max_ppl_increase == 5.0 == QuantSettings(precision="fp8").max_ppl_increase
    assert QuantSettings(precision="int4", max_ppl_increase=3).max_ppl_increase == 3
    plan = _invoke("compile", "tiny-llama", "--int4", "--dry-run")
    assert "accuracy gate" in plan.stdout and "15%" in plan.stdout and "eval_python_docs.txt" in plan.stdout


def test_failed_gate_keeps_its_report_beside_the_output_and_the_hint_points_there(tmp_path, monkeypatch):
    from leptonc.calibration.gate import default_heldout_text
    from leptonc.compiler import compile_model
    from leptonc.config import CompileConfig
    from leptonc.errors import VerificationError

    monkeypatch.setenv("LEPTONC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "broken.lepton"
    options = {"calib_samples": 4, "calib_seq_len": 64, "check_tokens": 256, "int4_method": "rtn",
               "break_scales": 1e-3, "max_ppl_increase": 1.0,  # weights collapsed: the gate must fail
               "check_data": str(default_heldout_text())}  # WikiText: the random model is not already flat there
    with pytest.raises(VerificationError) as info:
        compile_model(CompileConfig(source="tiny-llama", output=str(out), precision="int4", quantization=options,
                                    verify=False))
    report = Path(str(out) + ".failed-report.json")
    assert not out.exists() and report.is_file()
    saved = json.loads(report.read_text())["quantization"]
    assert saved["accuracy_gate"]["status"] == "failed" and saved["worst_layers"]
    assert str(report) in info.value.hint and "worst_layers" in info.value.hint


# ---- chat -------------------------------------------------------------------------------------------

def test_chat_answer_starts_on_its_own_line(tiny_bundle, monkeypatch):
    from leptonc.runtime import tokenizer as tokenizer_mod

    load = tokenizer_mod.load_tokenizer

    def with_template(directory):
        tok = load(directory)
        tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        return tok

    monkeypatch.setattr(tokenizer_mod, "load_tokenizer", with_template)
    res = _invoke("run", tiny_bundle, "-p", "Question?", "--chat", "-n", 3, "--ignore-eos")
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("Question?\n"), res.stdout


# ---- docs and packaging checked against the code -------------------------------------------------------

README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_exit_code_table_matches_the_code():
    from leptonc.errors import EXIT_CODES

    section = README.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| *(\d+) *\| *(.+?) *\|$", section, re.M))
    assert {int(k): v for k, v in rows.items()} == EXIT_CODES


def test_readme_fp8_refusal_lists_every_fp8_target_and_documents_the_commands():
    from leptonc.targets import TARGETS

    fp8 = [t.name for t in TARGETS.values() if "fp8" in t.native]
    refusal = next(line for line in README.splitlines() if "FP8 needs sm89+ tensor cores" in line)
    assert all(name in refusal for name in fp8), (fp8, refusal)
    assert not re.search(r"leptonc [^\n]*\.\./shared", README)  # commands use the text shipped in leptonc/data
    assert "../shared" in README.split("## Set-up", 1)[1].split("\n## ", 1)[0]  # make test says it needs it
    assert 'pip install -e ".[cuda]"' in README
    for documented in ("leptonc package", "--config", "--chat", "--prompt-file", "make test"):
        assert documented in README, documented


def test_example_config_plans_on_a_cpu_runner():
    res = _invoke("compile", "--config", ROOT / "examples" / "leptonc.toml", "--dry-run")
    assert res.exit_code == 0, res.output


def test_pyproject_declares_an_spdx_license_and_every_package():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(project["project"]["license"], str)
    packages = project["tool"]["setuptools"]["packages"]
    assert "leptonc.data" in packages or "leptonc.data" in str(project["tool"]["setuptools"])
