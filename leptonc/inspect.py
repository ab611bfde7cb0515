"""`leptonc inspect`: summarize a bundle, or an ONNX model (optionally linted for TensorRT)."""

from __future__ import annotations

from pathlib import Path

from leptonc.errors import BundleError, InputError, UnsupportedRequestError


def inspect_path(path: Path, *, verify: bool = True, trt: bool = False) -> dict:
    if path.is_dir():
        if trt:
            raise UnsupportedRequestError("--trt lints an .onnx model; give the model file, not a bundle")
        from leptonc.bundle import describe, load_bundle

        bundle = load_bundle(path, verify=verify)
        info = describe(bundle)
        info["verified_files"] = verify
        report = bundle.report()
        if report.get("graph"):
            info["graph"] = report["graph"]
        return info
    if not path.exists():  # exit 7 as for `run` and `bench` on a missing bundle
        raise BundleError(f"{path} does not exist", hint="give a .lepton bundle directory or an .onnx file")
    if path.suffix != ".onnx":
        raise InputError(f"{path} is neither a bundle directory nor an .onnx model")
    info = onnx_summary(path)
    if trt:
        from leptonc.targets.backends.tensorrt_lint import lint_model

        info["trt_lint"] = lint_model(path)
    return info


def onnx_summary(path: Path) -> dict:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends for a garbled file
        raise BundleError(f"{path} is not a readable ONNX model ({type(exc).__name__})",
                          hint="re-export it, or check the file was copied whole") from None
    ops: dict[str, int] = {}
    for node in model.graph.node:
        key = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        ops[key] = ops.get(key, 0) + 1

    def value_info(v):
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else None,
                "shape": dims}

    return {
        "path": str(path),
        "ir_version": model.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "producer": model.producer_name,
        "nodes": len(model.graph.node),
        "initializers": len(model.graph.initializer),
        "inputs": [value_info(v) for v in model.graph.input],
        "outputs": [value_info(v) for v in model.graph.output],
        "op_counts": dict(sorted(ops.items())),
    }
