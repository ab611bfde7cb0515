"""Trustworthy artifacts: reproducible builds, tamper detection on load, hostile external data.

Reproducibility contract: the same inputs and options give byte-identical bundle files (ONNX model and
data, tokenizer files, report.json) and so identical hashes in the manifest. The manifest itself differs
only in `created` (the one timestamp), `build_stats` (this run's wall times and peak memory,
deliberately kept out of the hashed report.json), its own seal `manifest_sha256`, and `name` (taken
from the output path).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import assert_clean_error, run_cli
from leptonc.bundle import MANIFEST, load_bundle, write_manifest, hash_files

VOLATILE = ("created", "build_stats", "manifest_sha256", "name")


def _stable(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in VOLATILE}


def _assert_reproduced(a: Path, b: Path) -> None:
    ma, mb = json.loads((a / MANIFEST).read_text()), json.loads((b / MANIFEST).read_text())
    assert ma["files"] == mb["files"]  # same names, sizes and sha256
    assert {"model.onnx", "model.onnx.data", "report.json"} <= set(ma["files"])
    assert any(f.startswith("tokenizer/") for f in ma["files"])
    for name in ma["files"]:  # and the bytes themselves, not just what the manifests claim
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert _stable(ma) == _stable(mb)
    assert ma["created"] and "timings_s" in ma["build_stats"]
    assert "timings_s" not in json.loads((a / "report.json").read_text())


def test_tiny_llama_builds_are_reproducible(tiny_bundle, tmp_path):
    from leptonc.compiler import compile_model
    from leptonc.config import CompileConfig

    again = compile_model(CompileConfig(source="tiny-llama", target="cpu", output=str(tmp_path / "tiny.cpu.lepton")))
    _assert_reproduced(tiny_bundle, again.path)


@pytest.mark.slow
def test_smollm2_builds_are_reproducible(smollm2_bundle, tmp_path):
    from leptonc.compiler import compile_model
    from leptonc.config import CompileConfig

    again = compile_model(CompileConfig(source="smollm2-135m", target="cpu",
                                        output=str(tmp_path / "smollm2.cpu.lepton")))
    _assert_reproduced(smollm2_bundle, again.path)


# ---- tampering ----------------------------------------------------------------------------------

FILE_KINDS = ["model.onnx", "model.onnx.data", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
              "report.json", "manifest.json"]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    from leptonc.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    captured = capsys.readouterr()
    return exit_.value.code, (captured.err + captured.out).replace("\n", "")


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    dst = tmp_path / "copy.lepton"
    shutil.copytree(tiny_bundle, dst)
    return dst


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("member", FILE_KINDS)
def test_any_changed_byte_is_refused_with_the_file_name(bundle_copy, member, where, capsys):
    path = bundle_copy / member
    data = bytearray(path.read_bytes())
    pos = {"first": 0, "middle": len(data) // 2, "last": len(data) - 1}[where]
    data[pos] ^= 0x20  # e.g. flips a letter's case: still valid JSON or protobuf in many places
    path.write_bytes(bytes(data))
    code, text = _run(["run", str(bundle_copy), "--prompt", "hello", "-n", "2"], capsys)
    assert code == 7, text
    assert Path(member).name in text, text


def test_a_valid_but_edited_manifest_is_refused(bundle_copy, capsys):
    """Editing a value while keeping valid JSON (e.g. raising max_sequence) is caught by the seal."""
    mf = bundle_copy / MANIFEST
    text = mf.read_text()
    assert '"max_sequence": 2048' in text
    mf.write_text(text.replace('"max_sequence": 2048', '"max_sequence": 4096'))
    code, out = _run(["run", str(bundle_copy), "--prompt", "hello", "-n", "2"], capsys)
    assert code == 7 and "manifest.json" in out, out
    # A file added after compile is refused too.
    write_manifest(bundle_copy, json.loads(text))
    (bundle_copy / "extra.bin").write_bytes(b"x")
    code, out = _run(["run", str(bundle_copy), "--prompt", "hello", "-n", "2"], capsys)
    assert code == 7 and "extra.bin" in out, out


def test_no_verify_is_the_escape_hatch(bundle_copy, capsys):
    report = bundle_copy / "report.json"
    report.write_text(report.read_text().replace('"leptonc_version"', '"leptonc_versioN"'))
    code, out = _run(["run", str(bundle_copy), "--prompt", "hello", "-n", "2"], capsys)
    assert code == 7 and "report.json" in out
    code, out = _run(["run", str(bundle_copy), "--prompt", "hello", "-n", "2", "--no-verify", "--json"], capsys)
    assert code == 0, out
    assert json.loads(out)["outputs"][0]["finish_reason"]


def test_tampered_bundle_through_a_real_process(bundle_copy):
    data = bytearray((bundle_copy / "model.onnx").read_bytes())
    data[100] ^= 0xFF
    (bundle_copy / "model.onnx").write_bytes(bytes(data))
    proc = run_cli("run", bundle_copy, "--prompt", "hi", "-n", "1", env={"COLUMNS": "300"})
    assert_clean_error(proc, 7)
    assert "model.onnx" in proc.stderr


# ---- hostile external data ------------------------------------------------------------------------

def _point_external_data(bundle: Path, location: str) -> None:
    """Rewrite model.onnx so its first external initializer reads from `location`, and re-seal the
    manifest with the new hashes: only the location check stands between this model and ORT."""
    import onnx

    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location
    (bundle / "model.onnx").write_bytes(model.SerializeToString())
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"] = hash_files(bundle)
    write_manifest(bundle, manifest)


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../secret.bin", "link.bin"])
def test_external_data_outside_the_bundle_is_refused(bundle_copy, tmp_path, location, capsys):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * (1 << 20))
    if location == "link.bin":
        (bundle_copy / "link.bin").symlink_to(secret)  # a symlink out of the bundle
    _point_external_data(bundle_copy, location)
    for argv in (["run", str(bundle_copy), "-p", "hi", "-n", "1"],
                 ["run", str(bundle_copy), "-p", "hi", "-n", "1", "--no-verify"],
                 ["inspect", str(bundle_copy)]):
        code, out = _run(argv, capsys)
        assert code == 7, (argv, out)
        assert "outside" in out, out
    # A bare model file gets the same check before ONNX Runtime opens it.
    code, out = _run(["run", str(bundle_copy / "model.onnx"), "--tokenizer", str(bundle_copy / "tokenizer"),
                      "-p", "hi", "-n", "1"], capsys)
    assert code == 7 and "outside" in out, out


def test_loaded_bundle_still_runs(tiny_bundle):
    """The checks above do not refuse the honest bundle."""
    bundle = load_bundle(tiny_bundle)
    assert bundle.manifest["manifest_sha256"]
