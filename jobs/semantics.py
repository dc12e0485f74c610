"""Teacher semantic extraction as a Ray job; the hf engine runs on a Ray Data actor pool, vllm on ray.data.llm.

    ray job submit --working-dir . -- python jobs/semantics.py --sids DIR --data DIR --out DIR --engine hf [key=value ...]

Takes the same flags as `tsrec semantics extract`. Paths are resolved on the cluster: use absolute
paths or shared storage, because the job's working directory is a temporary copy of this folder.
A rerun with the same --out resumes: tokens already extracted are skipped.
"""

import sys

import _entry  # noqa: F401  (puts the uploaded tsrec on sys.path)

from tsrec.cli import main

if __name__ == "__main__":
    sys.exit(main(["semantics", "extract", *sys.argv[1:]]))
