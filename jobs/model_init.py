"""Backbone with SID tokens and SA-Init (`tsrec model init`) as a Ray job.

    ray job submit --working-dir . --entrypoint-num-cpus 1 -- python jobs/model_init.py \
        --backbone PATH --sids DIR --semantics FILE --depth 3 --out DIR [key=value ...]

Takes the same flags as `tsrec model init`; runs in the job's driver process (no transformer layer is
run, only the embedding table changes). Paths are resolved on the cluster: use absolute paths or
shared storage, because the job's working directory is a temporary copy of this folder.
"""

import sys

import _entry  # noqa: F401  (puts the uploaded tsrec on sys.path)

from tsrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["model", "init", *sys.argv[1:]]))
