#!/usr/bin/env bash
# Install PyTorch into the given virtualenv without ever pulling a multi-GB CUDA build
# onto a machine that has no NVIDIA GPU.
#   - torch already importable: nothing to do.
#   - an NVIDIA GPU (nvidia-smi -L works): the regular PyPI wheel, which bundles CUDA.
#   - otherwise: the CPU build, first as a local/PyPI-mirror "+cpu" wheel, then from
#     PyTorch's CPU index.
set -euo pipefail
VENV="${1:-.venv}"
VERSION="${TORCH_VERSION:-2.13.0}"
PIP="$VENV/bin/pip"
if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') already installed"
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "NVIDIA GPU found: installing torch==$VERSION with CUDA"
  "$PIP" install "torch==$VERSION"
else
  echo "no NVIDIA GPU: installing the CPU build of torch==$VERSION"
  "$PIP" install "torch==$VERSION+cpu" 2>/dev/null \
    || "$PIP" install "torch==$VERSION" --index-url https://download.pytorch.org/whl/cpu
fi
