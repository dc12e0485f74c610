"""Evaluate a model (tsrec eval) as a Ray job: constrained beam search, HR@K / NDCG@K.

    ray job submit --working-dir . -- python jobs/evaluate.py --model DIR --data DIR --sids DIR \
        --split test --beams 20 --out DIR [--config FILE] [key=value ...]

Takes the same flags as `tsrec eval`. Rows are sharded over `resources.eval.workers` EvalActors
(`resources.eval.gpus_per_worker` GPUs each). Paths are resolved on the cluster: use absolute paths
or shared storage, because the job's working directory is a temporary copy of this folder.
Exits non-zero on failure.
"""

import sys

import _entry  # noqa: F401  (puts the uploaded tsrec on sys.path)

from tsrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
