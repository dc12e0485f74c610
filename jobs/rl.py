"""RL (tsrec rl, GRPO) as a Ray job: Ray Train TorchTrainer + DeepSpeed, rollouts inside the workers.

    ray job submit --working-dir . -- python jobs/rl.py --config configs/industrial_qwen2.5-1.5b-rl.yaml [flags] [key=value ...]

Takes the same flags as `tsrec rl` (--model, --data, --sids, --semantics, --out). Paths are resolved on the
cluster: use absolute paths or shared storage (and a cloud `rl.storage_path` on multi-node clusters), because
the job's working directory is a temporary copy of this folder. The driver calls `ray.init()` without
resources, so it joins the job's cluster.
"""

import sys

import _entry  # noqa: F401  (puts the uploaded tsrec on sys.path)

from tsrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["rl", *sys.argv[1:]]))
