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


# --- the import graph of tsrec/ (module-level and lazy, in-function imports alike) ---

RECIPES = ("tsrec.sft", "tsrec.rl", "tsrec.tune")  # one package per training recipe: none imports another


def import_graph(root: Path = REPO / "tsrec") -> dict[str, set[str]]:
    """``{module: the tsrec modules it imports}``, read from the source (``import a.b``, ``from a import
    b`` where ``a.b`` may be a module, relative imports), wherever in the module the import stands."""
    import ast

    files = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in files:  # `import tsrec.x.y.Z` -> the module that exists
                    name = name.rpartition(".")[0]
                if name.startswith("tsrec") and name != mod:
                    deps.add(name)
        graph[mod] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def recipe_of(mod: str) -> str | None:
    return next((r for r in RECIPES if mod == r or mod.startswith(r + ".")), None)


def test_no_import_cycle_inside_tsrec():
    graph = import_graph()
    assert "tsrec.train.engine" in graph["tsrec.sft.loop"] and "tsrec.train.engine" in graph["tsrec.rl.loop"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_recipe_imports_another_recipe():
    """SFT, RL and Tune stand on tsrec.train (torchtune's recipes/training split), never on each other."""
    crossing = sorted(f"{m} imports {d}" for m, deps in import_graph().items() for d in deps
                      if recipe_of(m) and recipe_of(d) and recipe_of(m) != recipe_of(d))
    assert not crossing, crossing


def test_the_graph_check_sees_a_cycle_and_a_recipe_crossing(tmp_path):
    """The two checks above on a small package with a lazy cycle and a recipe import: both are found."""
    pkg = tmp_path / "tsrec"
    for name, text in {"__init__.py": "", "sft/__init__.py": "", "rl/__init__.py": "",
                       "sft/loop.py": "def f():\n    from tsrec.rl.loop import g\n",
                       "rl/loop.py": "from tsrec.sft import loop\n"}.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph["tsrec.rl.loop"] == {"tsrec.sft.loop"} and graph["tsrec.sft.loop"] == {"tsrec.rl.loop"}
    assert find_cycle(graph) in (["tsrec.rl.loop", "tsrec.sft.loop", "tsrec.rl.loop"],
                                 ["tsrec.sft.loop", "tsrec.rl.loop", "tsrec.sft.loop"])
