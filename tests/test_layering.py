"""Core compute imports no Ray: every core module imports in a fresh interpreter without `ray`."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import tsrec

REPO = Path(__file__).resolve().parents[1]


def core_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(tsrec.__path__, prefix="tsrec."):
        if info.name.startswith("tsrec.orchestration") or info.name == "tsrec.__main__":
            continue
        names.append(info.name)
    return sorted(names)


def test_core_modules_do_not_import_ray():
    mods = core_modules()
    assert "tsrec.config" in mods and "tsrec.prompts" in mods
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}:\n"
        "    importlib.import_module(m)\n"
        "    assert 'ray' not in sys.modules, f'{m} imported ray'\n"
        "print('ok', len(" + repr(mods) + "))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
