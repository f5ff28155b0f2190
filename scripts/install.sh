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
set -euo pipefail
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
pip_q "setuptools>=69" wheel "pybind11>=2.12"
echo "install: speccascade_fast (editable, extras [dev]; compiles speccascade_fast._C)"
pip_q --no-build-isolation -e '.[dev]'
"$VENV/bin/python" - <<'PY'
from speccascade_fast import _ext

print("install: _C", "loaded" if _ext.HAS_CPU_EXT else f"NOT loaded ({_ext.IMPORT_ERROR})")
PY
