"""Stage the inputs tsrec's RayJobs read onto the shared volume (run once, by cluster/job-stage-inputs.yaml).

    python cluster/stage_inputs.py --root /mnt/shared [--backbone Qwen/Qwen2.5-1.5B ...] [--from DIR]

Layout under ``--root`` (the ``tsrec-shared`` PVC, mounted at /mnt/shared on every pod; cluster/README.md):

    data/amazon/Industrial_and_Scientific/{index,info,train,valid,test}/...   the MiniOneRec release
    data/tsrec/Industrial_and_Scientific/Industrial_and_Scientific.description_keywords.json
    models/<name>/                  a Hugging Face backbone folder (config.json, tokenizer, safetensors)
    runs/<run>/                     what the RayJobs write (pipeline stages, checkpoints)

Every data file is fetched from its pinned upstream commit and checked against the sha256 below (the
same bytes as ../shared/data, see its SOURCE.md files); a file already there with the right hash is kept.
``--from DIR`` copies from a local folder laid out like ``data/`` instead (a cluster without internet
access: ``kubectl cp`` the folder into the pod first). Backbones come from the Hugging Face Hub by id
(``huggingface_hub.snapshot_download``), which needs network access from the pod and HF_HUB_OFFLINE unset;
without it, copy the model folder to ``models/<name>`` yourself.

This is an operator's tool, run once before the first RayJob; tsrec itself never downloads anything.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

MINIONEREC = "https://raw.githubusercontent.com/AkaliKong/MiniOneRec"
DATA_COMMIT = "81b4ba9811cfb152cf161f1c486fe516510d081e"  # data files unchanged since 6ab2e45b (2025-10-24)
TEACHER_COMMIT = "c3202bec11a214b95159f640542708da328137d2"  # added ts_rec_data/ (TS-Rec's teacher file)
IND = "Industrial_and_Scientific"
SPLIT = f"{IND}_5_2016-10-2018-11"

# path under --root -> (source URL, sha256)
DATA_FILES: dict[str, tuple[str, str]] = {
    f"data/amazon/{IND}/index/{IND}.index.json": (
        f"{MINIONEREC}/{DATA_COMMIT}/data/Amazon/index/{IND}.index.json",
        "53f1aefbe8b8aa774326c122606c6525300c5a325e7b78817739d465aeb335f8"),
    f"data/amazon/{IND}/index/{IND}.item.json": (
        f"{MINIONEREC}/{DATA_COMMIT}/data/Amazon/index/{IND}.item.json",
        "937600c7a03652f55864a1d12d6e9fe8ca3e24ecc4e255a88216b25c5f949496"),
    f"data/amazon/{IND}/info/{SPLIT}.txt": (
        f"{MINIONEREC}/{DATA_COMMIT}/data/Amazon/info/{SPLIT}.txt",
        "bdc51fd9636e361db095c84de4e2650b3dd9606812c92e7a01f3b77c5c1a84f7"),
    f"data/amazon/{IND}/train/{SPLIT}.csv": (
        f"{MINIONEREC}/{DATA_COMMIT}/data/Amazon/train/{SPLIT}.csv",
        "da5f2af4f5047e18023dd4792f65a48bd7c8eab90447dd682fb48ca255d25f8c"),
    f"data/amazon/{IND}/valid/{SPLIT}.csv": (
        f"{MINIONEREC}/{DATA_COMMIT}/data/Amazon/valid/{SPLIT}.csv",
        "12bbb02bced0bd754a8b4e0f9ca4086416e30d12b0b73a2c95e7b195dd67385a"),
    f"data/amazon/{IND}/test/{SPLIT}.csv": (
        f"{MINIONEREC}/{DATA_COMMIT}/data/Amazon/test/{SPLIT}.csv",
        "973dd1db4fd549f3f2b40a0f039dbae157ebb92c716197cc246401e4e82c3a46"),
    f"data/tsrec/{IND}/{IND}.description_keywords.json": (
        f"{MINIONEREC}/{TEACHER_COMMIT}/ts_rec_data/{IND}.description_keywords.json",
        "0085864e4b66834601a7fd674393c505cb01243ce046c1f94a1323ae9781ca27"),
}
# Folders the RayJobs read (tests/orchestration/test_cluster_manifests.py checks every job input against them).
STAGED_DIRS = [f"data/amazon/{IND}", f"data/tsrec/{IND}", "models/Qwen2.5-1.5B", "models/Qwen2.5-7B"]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stage_file(root: Path, rel: str, url: str, digest: str, source_dir: Path | None) -> str:
    dest = root / rel
    if dest.exists() and sha256(dest) == digest:
        return "kept"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f".{dest.name}.", delete=False) as tmp:
        if source_dir is not None:
            with open(source_dir / Path(rel).relative_to("data"), "rb") as src:
                shutil.copyfileobj(src, tmp)
        else:
            with urllib.request.urlopen(url, timeout=120) as resp:
                shutil.copyfileobj(resp, tmp)
    got = sha256(Path(tmp.name))
    if got != digest:
        os.unlink(tmp.name)
        raise SystemExit(f"stage_inputs: {rel}: sha256 {got} != {digest} (from {source_dir or url})")
    os.replace(tmp.name, dest)
    return "staged"


def stage_backbone(root: Path, repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    dest = root / "models" / repo_id.split("/")[-1]
    snapshot_download(repo_id, local_dir=dest, allow_patterns=["*.json", "*.safetensors", "*.txt", "merges.txt",
                                                               "tokenizer*", "vocab*"])
    if not (dest / "config.json").exists():
        raise SystemExit(f"stage_inputs: {repo_id}: no config.json in {dest}")
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/mnt/shared")
    ap.add_argument("--backbone", action="append", default=[], help="Hugging Face Hub id, e.g. Qwen/Qwen2.5-1.5B")
    ap.add_argument("--from", dest="source", default=None, help="a local folder laid out like data/ (no download)")
    args = ap.parse_args(argv)
    root = Path(args.root)
    source = Path(args.source) if args.source else None
    for rel, (url, digest) in DATA_FILES.items():
        print(f"stage_inputs: {stage_file(root, rel, url, digest, source)} {root / rel}", flush=True)
    for repo_id in args.backbone:
        print(f"stage_inputs: backbone {repo_id} -> {stage_backbone(root, repo_id)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
