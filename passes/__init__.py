"""Graph passes on ONNX (installed as `leptonc.passes`). See `registry.py` for the pass contract."""

from leptonc.passes.registry import PASSES, PassContext, PassResult, get_pass, register_pass, run_pipeline

__all__ = ["PASSES", "PassContext", "PassResult", "get_pass", "register_pass", "run_pipeline"]
