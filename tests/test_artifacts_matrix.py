"""`leptonc compile --config leptonc.toml`: one bundle per entry, one summary, documented exit codes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from leptonc.bundle import load_bundle

ROOT = Path(__file__).resolve().parents[1]


def _main(argv: list[str], capsys) -> tuple[int, str, str]:
    from leptonc.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    cap = capsys.readouterr()
    return exit_.value.code, cap.out, cap.err


def test_matrix_builds_each_entry_and_reports_the_first_failure(tmp_path, capsys):
    cfg = tmp_path / "leptonc.toml"
    cfg.write_text('''
[defaults]
output_dir = "dist"
max_batch = 4

[[build]]
source = "tiny-llama"
name = "tiny"

[[build]]                      # an impossible parity threshold: verification fails (exit 6)
source = "tiny-llama"
name = "strict"
max_parity_error = 1e-30
''')
    code, out, err = _main(["compile", "--config", str(cfg), "--json"], capsys)
    summary = json.loads(out)
    assert code == 6, err
    assert summary["exit_code"] == 6 and summary["built"] == 1 and summary["failed"] == 1
    ok, bad = summary["entries"]
    assert ok["status"] == "built" and ok["exit_code"] == 0
    bundle = load_bundle(ok["output"])  # complete and verified
    assert Path(ok["output"]) == tmp_path / "dist" / "tiny.cpu.fp32.lepton"
    assert bundle.manifest["limits"]["max_batch"] == 4
    assert ok["engine_sha256"] == bundle.manifest["files"]["model.onnx"]["sha256"]
    assert bad["status"] == "failed" and bad["exit_code"] == 6 and "does not match PyTorch" in bad["error"]
    assert not Path(bad["output"]).exists()  # a failed entry leaves nothing behind


def test_matrix_file_errors_build_nothing(tmp_path, capsys):
    cases = {
        "bad key": '[[build]]\nsource = "tiny-llama"\ncolour = "red"\n',
        "bad target": '[[build]]\nsource = "tiny-llama"\ntargets = ["cpu", "h900"]\n',
        "fp8 on a100": '[[build]]\nsource = "tiny-llama"\ntarget = "a100"\nprecision = "fp8"\n',
        "duplicate output": '[[build]]\nsource = "tiny-llama"\n[[build]]\nsource = "tiny-llama"\n',
        "not toml": '[[build]\nsource = \n',
        "no builds": '[defaults]\nmax_batch = 2\n',
        "wrong type": '[[build]]\nsource = "tiny-llama"\nmax_batch = "eight"\n',
    }
    for what, text in cases.items():
        cfg = tmp_path / f"{what.replace(' ', '_')}.toml"
        cfg.write_text(text)
        code, out, err = _main(["compile", "--config", str(cfg)], capsys)
        assert code == 2, (what, err)
        assert "error" in err and "Traceback" not in err, (what, err)
    assert not list(tmp_path.glob("*.lepton")) and not list(tmp_path.glob(".leptonc-tmp-*"))
    # SOURCE and --config together, or a single-build flag with --config, are refused.
    cfg = tmp_path / "ok.toml"
    cfg.write_text('[[build]]\nsource = "tiny-llama"\n')
    assert _main(["compile", "tiny-llama", "--config", str(cfg)], capsys)[0] == 2
    code, _, err = _main(["compile", "--config", str(cfg), "--target", "h100"], capsys)
    assert code == 2 and "--target" in err
    assert _main(["compile"], capsys)[0] == 2


def test_example_matrix_plans_every_entry(capsys):
    code, out, err = _main(["compile", "--config", str(ROOT / "examples" / "leptonc.toml"), "--dry-run", "--json"],
                           capsys)
    assert code == 0, err
    plans = json.loads(out)["entries"]
    # backend auto: TensorRT where its builder imports, else ONNX Runtime
    expected_gpu_backend = "tensorrt" if importlib.util.find_spec("tensorrt") else "onnxruntime"
    assert [(Path(p["output"]).name, p["plan"]["backend"]) for p in plans] == [
        ("smollm2.cpu.fp32.lepton", "onnxruntime"), ("smollm2.h100.fp16.lepton", expected_gpu_backend),
        ("tiny.cpu.fp32.lepton", "onnxruntime")]
