"""Ray Tune sweep (tsrec tune) as a Ray job: trials are SFT TorchTrainers on the job's cluster.

    ray job submit --working-dir . -- python jobs/tune.py --config configs/sweeps/industrial_qwen2.5-1.5b.yaml [key=value ...]

Use an absolute (shared) `run.out_dir`: the job's working directory is a temporary copy, and the sweep
resumes from `<storage>/ray/sweep-<identity>` (`tune.storage_path`, default `<run.out_dir>/<tune.dir>`) when the same sweep is submitted again.
"""

import sys

import _entry  # noqa: F401  (puts the uploaded tsrec on sys.path)

from tsrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
