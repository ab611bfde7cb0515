"""The backends that build an engine for a target: ONNX Runtime and TensorRT, each with its pass
pipeline, preflight checks, build step and runner (see base.py for the interface they share)."""
