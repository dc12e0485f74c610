#!/usr/bin/env bash
# The checks only a GPU shows, in one command for a lent GPU machine (see ../shared/device/README.md):
#   1. `pytest -m gpu` over every module with gpu-marked tests: bf16/fp32 constrained decoding on CUDA
#      vs exhaustive scoring and transformers' beam search, the MFU column of bf16 SFT, flash-attention
#      packing, the vLLM teacher (skips where vLLM is missing, as on the lent image);
#   2. the decode benchmark: python benchmarks/decode.py --preset qwen2.5-1.5b --device cuda --dtype bfloat16 --batches 20
# Results go under $OUT (the device tool's output folder) or runs/gpu_checks: pytest.log, junit.xml,
# decode_bench.log, RESULTS.md (the benchmark's appended section), env.txt.
#
# On the CPU machine, once:   bash ../shared/device/pack.sh && bash scripts/gpu_checks.sh --pack
#   (--pack copies the Industrial SID index the benchmark needs into .device/gpu-checks/, git-ignored;
#    ../shared does not travel)
# On the GPU machine (device `run` tool): carry [".device/ray-2.60.0.tar.xz", ".device/wheels",
#   ".device/setup.sh", ".device/gpu-checks"], command: bash .device/setup.sh && bash scripts/gpu_checks.sh
# Exit status: 0 when every check passed, 1 otherwise (every check runs regardless), 2 without CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."
INDEX_NAME=Industrial_and_Scientific.index.json
PACKED=.device/gpu-checks

if [ "${1:-}" = "--pack" ]; then
  set -e
  mkdir -p "$PACKED"
  cp ../shared/data/amazon/Industrial_and_Scientific/index/$INDEX_NAME "$PACKED/"
  du -sh "$PACKED"
  exit 0
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
OUT=${OUT:-runs/gpu_checks}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
unset DS_ACCELERATOR  # DeepSpeed must pick CUDA here
if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_checks: no CUDA device visible; nothing to check" | tee "$OUT/env.txt"
  exit 2
fi
"$PY" -c "import torch, transformers; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), 'transformers', transformers.__version__)" \
  | tee "$OUT/env.txt"

rc=0
# Every module with gpu-marked tests (tests/gpu/ and e.g. tests/sft/test_flash_packing.py), named
# explicitly: collecting the whole suite would import what this image lacks (faiss, ...).
mapfile -t gpu_files < <(grep -rlE "mark\.gpu|pytest\.mark\.gpu" tests --include='*.py' | sort)
echo "== pytest -m gpu ${gpu_files[*]}"
"$PY" -m pytest -q -m gpu "${gpu_files[@]}" -rs -p no:cacheprovider --junitxml "$OUT/junit.xml" 2>&1 \
  | tee "$OUT/pytest.log" || rc=1

echo "== decode benchmark (qwen2.5-1.5b shape, bf16, 20 batches)"
index=../shared/data/amazon/Industrial_and_Scientific/index/$INDEX_NAME
[ -f "$index" ] || index=$PACKED/$INDEX_NAME
if [ -f "$index" ]; then
  "$PY" benchmarks/decode.py --preset qwen2.5-1.5b --device cuda --dtype bfloat16 --batches 20 --index "$index" 2>&1 \
    | tee "$OUT/decode_bench.log" || rc=1
  cp benchmarks/RESULTS.md "$OUT/RESULTS.md" 2>/dev/null || true
else
  echo "gpu_checks: SID index not found (run scripts/gpu_checks.sh --pack on the CPU machine and carry $PACKED)" \
    | tee "$OUT/decode_bench.log"
  rc=1
fi
echo "gpu_checks: $([ $rc = 0 ] && echo all passed || echo FAILED), results in $OUT"
exit $rc
