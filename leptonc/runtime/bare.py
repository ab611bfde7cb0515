"""Running a bare model file (no bundle): `leptonc run model.onnx --tokenizer DIR` or an engine.plan."""

from __future__ import annotations

from pathlib import Path

from leptonc.errors import InputError
from leptonc.graph_contract import INPUT_IDS, LOGITS, cache_layers, past_key
from leptonc.inspect import onnx_summary
from leptonc.runtime.tokenizer import eos_ids, load_tokenizer


def io_from_onnx(path: Path) -> dict:
    """Rebuild the I/O spec of a leptonc-style decoder from the graph's inputs and outputs."""
    info = onnx_summary(path)
    names = {v["name"]: v for v in info["inputs"] + info["outputs"]}
    layers = cache_layers(names)
    if not layers or INPUT_IDS not in names or LOGITS not in names:
        raise InputError(f"{path} is not a leptonc-style decoder (needs input_ids, past_key_values.N.key/value, "
                         "logits)", hint="compile the model with `leptonc compile` first")
    kv = names[past_key(0)]
    vocab = names[LOGITS]["shape"][-1]
    if not isinstance(vocab, int) or not isinstance(kv["shape"][1], int) or not isinstance(kv["shape"][3], int):
        raise InputError(f"{path}: cannot read vocab size and head shape from the graph's I/O")
    return {"inputs": info["inputs"], "outputs": info["outputs"], "kv_dtype": kv["dtype"], "num_layers": len(layers),
            "num_kv_heads": kv["shape"][1], "head_dim": kv["shape"][3], "vocab_size": vocab}


def open_bare(path: Path, tokenizer_dir: str | None, device: str | None = None):
    if tokenizer_dir is None:
        raise InputError(f"{path} is a bare model file: pass --tokenizer DIR (a Hugging Face tokenizer directory)")
    tokenizer = load_tokenizer(Path(tokenizer_dir))
    limits = {"max_sequence": 4096, "max_batch": 64}
    if path.suffix == ".plan" or path.suffix == ".engine":
        from leptonc.targets.backends.tensorrt import open_bare_engine

        runner = open_bare_engine(path)
    elif path.suffix == ".onnx":
        from leptonc.bundle import check_onnx_model, engine_load_errors
        from leptonc.targets.backends.onnxruntime import open_runner

        check_onnx_model(path)  # external data must stay beside the model; checked before ORT opens it
        provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
        engine = {"io": io_from_onnx(path), "session": {"provider": provider}}
        with engine_load_errors(path):
            runner = open_runner(path, engine, limits, device)
    else:
        raise InputError(f"{path}: unknown model file type; give an .onnx model or a TensorRT .plan engine")
    return runner, tokenizer, eos_ids(tokenizer), None
