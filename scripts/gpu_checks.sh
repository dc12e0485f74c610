#!/usr/bin/env bash
# The checks only a GPU shows, in one command for a lent GPU machine (see ../shared/device/README.md), with a
# CPU mode that runs the same tests' CPU halves (GPU parts skipped with the reason) so the script itself is tested.
#
#   bash scripts/gpu_checks.sh --pack   # on the CPU machine, once: builds the carry set (<= 64 MiB, checked)
#   bash scripts/gpu_checks.sh          # GPU machine; without a visible CUDA device it runs the CPU mode
#   bash scripts/gpu_checks.sh --cpu    # CPU mode explicitly
#
# Checks (tests/gpu/test_device_checks.py; every test there has a CPU half that CPU CI runs too):
#   1. SFT on the device: DeepSpeed engine on cuda, bf16 ZeRO-2 on the Qwen2.5-1.5B shape, tokens/s and MFU;
#   2. decode parity fp32 and bf16 vs exhaustive scoring; 3. packed vs unpacked loss, attention backend named;
#   4. RL 3 steps under ZeRO-2 and ZeRO-3, equal step-0 losses; 5. placement: a zero-GPU actor (and Ray Data
#   pool actor) sees no GPU, a one-GPU actor one, and one eval worker on a cluster is a GPU actor.
# Then `pytest -m gpu` over the other gpu-marked modules (tests/gpu/test_cuda_checks.py, flash packing, ...) and
# the decode benchmark (qwen2.5-1.5b shape, bf16, 20 batches).
#
# One results file: $OUT/gpu_checks.json (mode, environment, every test's outcome with its skip/failure reason,
# what each check measured, the benchmark's summary); the raw logs beside it. $OUT is the device tool's output
# folder, else runs/gpu_checks.
# GPU machine (device `run` tool): carry [".device/ray-2.60.0.tar.xz", ".device/wheels", ".device/setup.sh",
#   ".device/gpu-checks"], command: bash .device/setup.sh && bash scripts/gpu_checks.sh   (timeout_s 540)
# Exit status: 0 when every check passed (or was skipped for a stated reason in CPU mode), 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
INDEX_NAME=Industrial_and_Scientific.index.json
PACKED=.device/gpu-checks
CARRY=(.device/ray-2.60.0.tar.xz .device/wheels .device/setup.sh "$PACKED")
LIMIT_BYTES=$((64 * 1024 * 1024))

if [ "${1:-}" = "--pack" ]; then
  set -e
  if [ ! -f .device/ray-2.60.0.tar.xz ] || [ ! -f .device/setup.sh ] || [ ! -d .device/wheels ]; then
    bash ../shared/device/pack.sh  # Ray without jars/RLlib, DeepSpeed source, small wheels (needs PyPI)
  fi
  mkdir -p "$PACKED"
  cp ../shared/data/amazon/Industrial_and_Scientific/index/$INDEX_NAME "$PACKED/"
  # What one device call carries: these paths plus the working tree (tracked and untracked, not ignored, files).
  carry=$(du -cb "${CARRY[@]}" | tail -1 | cut -f1)
  tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  total=$((carry + tree))
  echo "gpu_checks --pack: carry $carry + working tree $tree = $total bytes" \
    "($(awk -v b="$total" 'BEGIN { printf "%.1f", b / 1048576 }') MiB; limit 64 MiB)"
  du -sh "${CARRY[@]}"
  if [ "$total" -gt "$LIMIT_BYTES" ]; then
    echo "gpu_checks --pack: over the 64 MiB a device call carries" >&2
    exit 1
  fi
  exit 0
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
OUT=${OUT:-runs/gpu_checks}
mkdir -p "$OUT"
RECORDS="$OUT/records.jsonl"
rm -f "$RECORDS" "$OUT"/*.xml
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 TSREC_GPU_CHECKS_RECORDS="$RECORDS"
t_start=$(date +%s)

MODE=gpu
if [ "${1:-}" = "--cpu" ]; then
  MODE=cpu
  export CUDA_VISIBLE_DEVICES=""  # --cpu on a GPU machine: the tests must not see its GPUs
elif ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  MODE=cpu  # (CUDA_VISIBLE_DEVICES left alone, so the placement probe still tests tsrec's own hiding)
fi
if [ "$MODE" = gpu ]; then
  unset DS_ACCELERATOR  # DeepSpeed must pick CUDA (tests/conftest.py keeps it unset when CUDA is visible)
else
  export DS_ACCELERATOR=cpu
fi
echo "gpu_checks: $MODE mode"
"$PY" - > "$OUT/env.json" <<'EOF'
import json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
for mod in ("transformers", "ray", "deepspeed", "flash_attn", "vllm"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as e:  # noqa: BLE001 - reported, not raised
        info[mod] = f"missing ({type(e).__name__})"
print(json.dumps(info))
EOF
cat "$OUT/env.json"

rc=0
# Step time limits keep the whole run under 8 minutes on the lent GPU machine (after setup.sh).
echo "== 1. device checks (tests/gpu/test_device_checks.py)"
timeout 300 "$PY" -m pytest -q tests/gpu/test_device_checks.py -rs -p no:cacheprovider \
  --junitxml "$OUT/device_checks.xml" 2>&1 | tee "$OUT/device_checks.log"
[ "${PIPESTATUS[0]}" = 0 ] || rc=1

# Every other module with gpu-marked tests, named explicitly: collecting the whole suite would import what the
# lent image lacks (faiss, ...). In CPU mode they are collected and skip ("needs CUDA").
mapfile -t gpu_files < <(grep -rlE "mark\.gpu|pytest\.mark\.gpu" tests --include='*.py' | sort)
echo "== 2. pytest -m gpu ${gpu_files[*]}"
timeout 120 "$PY" -m pytest -q -m gpu "${gpu_files[@]}" -rs -p no:cacheprovider \
  --junitxml "$OUT/gpu_marked.xml" 2>&1 | tee "$OUT/gpu_marked.log"
[ "${PIPESTATUS[0]}" = 0 ] || rc=1

echo "== 3. decode benchmark (qwen2.5-1.5b shape, bf16, 20 batches)"
index=../shared/data/amazon/Industrial_and_Scientific/index/$INDEX_NAME
[ -f "$index" ] || index=$PACKED/$INDEX_NAME
if [ "$MODE" = cpu ]; then
  echo "skipped: needs CUDA (the qwen2.5-1.5b shape in bf16; CPU decode speed is benchmarks/decode.py --preset small)" \
    | tee "$OUT/decode_bench.log"
elif [ -f "$index" ]; then
  timeout 90 "$PY" benchmarks/decode.py --preset qwen2.5-1.5b --device cuda --dtype bfloat16 --batches 20 \
    --index "$index" --no-record 2>&1 | tee "$OUT/decode_bench.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
else
  echo "failed: SID index not found (run scripts/gpu_checks.sh --pack on the CPU machine and carry $PACKED)" \
    | tee "$OUT/decode_bench.log"
  rc=1
fi

# The one results file.
"$PY" - "$OUT" "$MODE" "$rc" "$(( $(date +%s) - t_start ))" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out, mode, rc, seconds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tests = []
for xml in ("device_checks.xml", "gpu_marked.xml"):
    if not (out / xml).exists():
        tests.append({"suite": xml, "outcome": "failed", "reason": "no junit report (timed out or crashed)"})
        continue
    for case in ET.parse(out / xml).getroot().iter("testcase"):
        outcome, reason = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = "skipped" if tag == "skipped" else "failed"
                reason = (node.get("message") or "")[:500]
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), **({"reason": reason} if reason else {})})
records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()] \
    if (out / "records.jsonl").exists() else []
bench = (out / "decode_bench.log").read_text().strip().splitlines() if (out / "decode_bench.log").exists() else []
counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped")}
result = {"mode": mode, "ok": rc == 0 and counts["failed"] == 0, "seconds": seconds, "counts": counts,
          "env": json.loads((out / "env.json").read_text()), "tests": tests, "measured": records,
          "decode_benchmark": bench[-12:]}
(out / "gpu_checks.json").write_text(json.dumps(result, indent=1))
print(f"gpu_checks: {mode} mode, {counts}, {seconds} s, results in {out / 'gpu_checks.json'}")
EOF
echo "gpu_checks: $([ $rc = 0 ] && echo all passed || echo FAILED)"
exit $rc
