"""Run the whole pipeline (tsrec run) as a Ray job on the cluster it is submitted to.

    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/demo.yaml [flags] [key=value ...]

Takes the same flags as `tsrec run` (without --ray). Paths are resolved on the cluster: use absolute
paths or shared storage, because the job's working directory is a temporary copy of this folder.
"""

import sys

import _entry  # noqa: F401  (puts the uploaded tsrec on sys.path)

from tsrec.cli import main

if __name__ == "__main__":
    sys.exit(main(['run', *sys.argv[1:]]))
