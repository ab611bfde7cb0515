"""`leptonc package --triton`: the config.pbtxt parses as Triton's own ModelConfig protobuf. The default
Python-backend model (leptonc's engine) is decoupled, with text in and out and the asked instance groups;
the raw decoder (`--triton-raw-decoder`) matches the manifest's I/O spec and its version folder holds the
bundle's verified bytes and still runs. tests/test_triton_server.py starts the real server on the former."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_clean_error, run_cli
from leptonc.bundle import Bundle, load_bundle, sha256_file, write_manifest


def _model_config_pb2():
    """Triton's ModelConfig protobuf, from the tritonclient wheel. Loaded from its file: importing the
    `tritonclient.grpc` package would also need grpcio, which this test does not."""
    tritonclient = pytest.importorskip("tritonclient", reason="pip install tritonclient (the `test` extra)")
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse(text: str):
    from google.protobuf import text_format

    pb = _model_config_pb2()
    return pb, text_format.Parse(text, pb.ModelConfig())


def _assert_matches_manifest(pb, cfg, manifest: dict) -> None:
    io = manifest["engine"]["io"]
    assert cfg.max_batch_size == manifest["limits"]["max_batch"]
    for declared, listed in ((cfg.input, io["inputs"]), (cfg.output, io["outputs"])):
        assert [t.name for t in declared] == [t["name"] for t in listed]
        for t, m in zip(declared, listed):
            want = {"int64": pb.TYPE_INT64, "float32": pb.TYPE_FP32, "float16": pb.TYPE_FP16}[m["dtype"]]
            assert t.data_type == want, (t.name, t.data_type, m["dtype"])
            assert m["shape"][0] == "batch"  # Triton's batch dim is implicit with max_batch_size > 0
            assert list(t.dims) == [d if isinstance(d, int) else -1 for d in m["shape"][1:]], t.name
    n = manifest["engine"]["io"]["num_layers"]
    # The KV cache is explicit: one input and one output tensor per layer and per key/value.
    assert sum(t.name.startswith("past_key_values.") for t in cfg.input) == 2 * n
    assert sum(t.name.startswith("present.") for t in cfg.output) == 2 * n
    assert cfg.HasField("dynamic_batching")
    assert len(cfg.instance_group) == 1 and cfg.instance_group[0].count == 1


def test_cpu_onnxruntime_bundle_packages_as_raw_decoder(tiny_bundle, tmp_path, capsys):
    from leptonc.cli import main

    repo = tmp_path / "models"
    with pytest.raises(SystemExit) as exit_:
        main(["package", str(tiny_bundle), "--triton", str(repo), "--triton-raw-decoder", "--name", "tiny",
              "--json"])
    assert exit_.value.code == 0
    result = json.loads(capsys.readouterr().out)
    model_dir = repo / "tiny"
    assert result["model_dir"] == str(model_dir)

    pb, cfg = _parse((model_dir / "config.pbtxt").read_text())
    manifest = load_bundle(tiny_bundle).manifest
    assert cfg.name == "tiny"
    assert cfg.platform == "onnxruntime_onnx" and cfg.backend == "onnxruntime"
    assert cfg.default_model_filename == "model.onnx"
    assert cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    _assert_matches_manifest(pb, cfg, manifest)

    # Version folder: the engine and its external data, byte-identical to the verified bundle.
    for name in ("model.onnx", "model.onnx.data"):
        assert sha256_file(model_dir / "1" / name) == manifest["files"][name]["sha256"]
    assert (model_dir / "tokenizer" / "tokenizer.json").is_file()
    # The packaged model runs where Triton's ONNX Runtime backend will load it (same folder layout).
    from leptonc.targets.backends.onnxruntime import open_runner

    runner = open_runner(model_dir / "1" / "model.onnx", manifest["engine"], manifest["limits"])
    try:
        logits = runner.prefill(np.array([[1, 2, 3]]), np.ones((1, 3), np.int64))
    finally:
        runner.release()
    assert logits.shape == (1, 3, manifest["engine"]["io"]["vocab_size"]) and np.isfinite(logits).all()

    # An existing model of that name is not overwritten without --force.
    with pytest.raises(SystemExit) as exit_:
        main(["package", str(tiny_bundle), "--triton", str(repo), "--triton-raw-decoder", "--name", "tiny"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        main(["package", str(tiny_bundle), "--triton", str(repo), "--triton-raw-decoder", "--name", "tiny", "--force",
              "--version", "3"])
    assert exit_.value.code == 0
    assert sorted(p.name for p in model_dir.iterdir() if p.is_dir()) == ["3", "tokenizer"]


def test_h100_tensorrt_config_parses_and_matches_io_spec(tiny_bundle, tmp_path):
    """TensorRT's builder is not installable here, so no h100 engine can be built. The manifest is built
    from the same I/O spec the TensorRT backend declares (`targets.tensorrt.build` records
    `exported.io`, i.e. export.io_spec(spec, tensorrt.export_dtype(...))) with a placeholder plan file;
    only config.pbtxt generation and the repository layout are tested, not the engine."""
    from leptonc.export import io_spec
    from leptonc.models.adapters import get_adapter
    from leptonc.models.intake import load_model
    from leptonc.triton_repository import TritonOptions, triton_config, write_triton_model
    from leptonc.targets import get_target
    from leptonc.targets.backends import tensorrt as trt_backend

    lm = load_model("tiny-llama")
    spec = get_adapter(lm.model_type).spec(lm.module)
    h100 = get_target("h100")
    dtype = trt_backend.export_dtype(h100, "fp16")
    base = load_bundle(tiny_bundle).manifest
    manifest = {**base, "backend": "tensorrt", "precision": "fp16", "target": h100.to_dict(),
                "limits": {"max_batch": 8, "max_sequence": 1024},
                "engine": {"file": trt_backend.ENGINE_FILE, "format": "tensorrt-plan", "io": io_spec(spec, dtype)}}
    import hashlib

    manifest["files"] = {trt_backend.ENGINE_FILE: {"sha256": hashlib.sha256(b"plan").hexdigest(), "bytes": 4}}
    manifest["tokenizer"] = None

    pb, cfg = _parse(triton_config(manifest, TritonOptions(name="tiny_h100", instances=2, raw_decoder=True)))
    assert cfg.platform == "tensorrt_plan" and cfg.backend == "tensorrt"
    assert cfg.default_model_filename == "engine.plan"
    assert cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU and cfg.instance_group[0].count == 2
    assert {t.data_type for t in cfg.input if t.name.startswith("past_key_values.")} == {pb.TYPE_FP16}
    cfg.instance_group[0].count = 1
    _assert_matches_manifest(pb, cfg, manifest)

    fake = tmp_path / "h100.lepton"
    fake.mkdir()
    (fake / trt_backend.ENGINE_FILE).write_bytes(b"plan")  # placeholder: layout only, never loaded
    write_manifest(fake, manifest)
    out = write_triton_model(Bundle(fake, manifest), tmp_path / "repo", TritonOptions(name="tiny_h100",
                                                                                     raw_decoder=True))
    assert sorted(out["files"]) == ["1/engine.plan", "config.pbtxt", "leptonc-manifest.json"]


def test_package_refuses_a_tampered_bundle_and_bad_options(tiny_bundle, tmp_path):
    bundle = tmp_path / "t.lepton"
    shutil.copytree(tiny_bundle, bundle)
    data = bytearray((bundle / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / "model.onnx.data").write_bytes(bytes(data))
    proc = run_cli("package", bundle, "--triton", tmp_path / "repo", env={"COLUMNS": "300"})
    assert_clean_error(proc, 7)
    assert "model.onnx.data" in proc.stderr
    assert not (tmp_path / "repo" / "t").exists()

    from leptonc.cli import main

    for argv, code in ((["package", str(tiny_bundle)], 2),  # --triton is required
                       (["package", str(tiny_bundle), "--triton", str(tmp_path / "r"), "--name", "../x"], 2),
                       (["package", str(tmp_path / "missing.lepton"), "--triton", str(tmp_path / "r")], 7)):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == code, argv


def test_python_model_config_runs_the_engine_decoupled_with_instance_groups(tiny_bundle, tmp_path, capsys):
    from leptonc.cli import main
    from leptonc.triton_repository import BUNDLE_IN_VERSION, PYTHON_MODEL_FILE

    repo = tmp_path / "models"
    with pytest.raises(SystemExit) as exit_:
        main(["package", str(tiny_bundle), "--triton", str(repo), "--name", "tiny", "--instance-group", "cpu:2",
              "--max-queue", "8", "--json"])
    assert exit_.value.code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["platform"] == "python"
    model_dir = repo / "tiny"
    pb, cfg = _parse((model_dir / "config.pbtxt").read_text())
    assert cfg.backend == "python" and cfg.max_batch_size == 0
    assert cfg.model_transaction_policy.decoupled
    assert [(t.name, t.optional) for t in cfg.input][:2] == [("text_input", False), ("max_tokens", True)]
    assert cfg.input[0].data_type == pb.TYPE_STRING
    assert {t.name for t in cfg.output} == {"text_output", "output_ids", "finish_reason"}
    assert [(g.kind, g.count) for g in cfg.instance_group] == [(pb.ModelInstanceGroup.KIND_CPU, 2)]
    assert cfg.parameters["leptonc_bundle"].string_value == BUNDLE_IN_VERSION
    assert cfg.parameters["leptonc_max_queue"].string_value == "8"
    # The version folder: leptonc's model and the whole bundle, which still loads and verifies there.
    assert (model_dir / "1" / "model.py").read_bytes() == PYTHON_MODEL_FILE.read_bytes()
    copied = load_bundle(model_dir / "1" / BUNDLE_IN_VERSION, verify=True)
    assert copied.manifest == load_bundle(tiny_bundle).manifest

    # GPU groups: one instance per listed GPU; refused for a bundle compiled for the CPU.
    from leptonc.triton_repository import InstanceGroup, python_model_config, TritonOptions
    from leptonc.errors import UnsupportedRequestError

    gpu_manifest = {**copied.manifest, "engine": {**copied.manifest["engine"],
                                                  "session": {"provider": "CUDAExecutionProvider"}}}
    _, gpu_cfg = _parse(python_model_config(gpu_manifest, TritonOptions(
        instance_groups=(InstanceGroup.parse("gpu:0,2"),))))
    assert [(g.kind, g.count, list(g.gpus)) for g in gpu_cfg.instance_group] == [
        (pb.ModelInstanceGroup.KIND_GPU, 1, [0, 2])]
    with pytest.raises(UnsupportedRequestError, match="compiled for the CPU"):
        python_model_config(copied.manifest, TritonOptions(instance_groups=(InstanceGroup.parse("gpu"),)))
    for bad in ("tpu", "gpu:a", "cpu:0", "gpu:1,1"):
        with pytest.raises(UnsupportedRequestError):
            InstanceGroup.parse(bad)
    proc = run_cli("package", tiny_bundle, "--triton", tmp_path / "r2", "--instance-group", "gpu:0")
    assert_clean_error(proc, 2)
    assert "compiled for the CPU" in proc.stderr
