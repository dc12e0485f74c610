"""Build Semantic IDs as a Ray job; item embeddings run on a Ray Data actor pool.

    ray job submit --working-dir . -- python jobs/sid.py --config configs/demo.yaml [flags] [key=value ...]

Takes the same flags as `tsrec sid build`. Paths are resolved on the cluster: use absolute
paths or shared storage, because the job's working directory is a temporary copy of this folder.
"""

import sys

import _entry  # noqa: F401  (puts the uploaded tsrec on sys.path)

from tsrec.cli import main

if __name__ == "__main__":
    sys.exit(main(['sid', 'build', '--ray', *sys.argv[1:]]))
