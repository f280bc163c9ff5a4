"""The structure rules of ARCHITECTURE.md, checked on the source: which stage may import which, and no cycles."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("extract", "store", "train")


def fpt_imports(path: Path) -> set[str]:
    """The fpt modules a source file imports (``fpt.x.y``), at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fpt"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names
                         if (ROOT / Path(*node.module.split(".")[1:]) / a.name).with_suffix(".py").exists())
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fpt"))
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("fpt", *(p for p in parts if p != "__init__")))


def package_files(stage: str) -> list[Path]:
    return sorted((ROOT / stage).glob("*.py"))


def test_train_never_imports_extract():
    for path in package_files("train"):
        bad = sorted(m for m in fpt_imports(path) if m.startswith("fpt.extract"))
        assert not bad, f"{path.name} imports {bad}: training is fed only from fpt.store"


def test_store_imports_nothing_of_fpt_but_the_error_type():
    for path in package_files("store"):
        bad = sorted(m for m in fpt_imports(path) if not m.startswith("fpt.store") and m != "fpt")
        assert not bad, f"store/{path.name} imports {bad}"


def test_stages_do_not_import_the_cli_or_commands_above_them():
    for stage in STAGES:
        for path in package_files(stage):
            bad = sorted(m for m in fpt_imports(path) if m in ("fpt.cli", "fpt.predict"))
            assert not bad, f"{stage}/{path.name} imports {bad}"


def test_no_import_cycles_between_modules():
    files = [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and "tests" not in p.parts]
    graph = {module_name(p): {m for m in fpt_imports(p)} for p in files}
    graph = {m: {d for d in deps if d in graph and d != m and not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, trail + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


# entry modules a stage's door names besides itself (train/__init__.py: sweeps, token maps; typed results)
SUB_ENTRIES = {"fpt.train.sweep", "fpt.train.show", "fpt.train.results"}


def test_code_outside_a_stage_goes_through_its_door():
    """``from fpt.extract import ...``, not ``from fpt.extract.images import ...``, outside extract/ (and so for
    store/ and train/); bench/ and tests/ measure and test the insides and are left out."""
    files = [p for p in ROOT.rglob("*.py") if not {".venv", "tests", "bench"} & set(p.parts)]
    for path in files:
        own = path.relative_to(ROOT).parts[0]
        named = {n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom) and n.module}
        named |= {a.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Import) for a in n.names}
        bad = sorted(m for m in named if m.count(".") >= 2 and m.split(".")[1] in STAGES
                     and m.split(".")[1] != own and m not in SUB_ENTRIES)
        assert not bad, f"{path.relative_to(ROOT)} imports {bad} past the stage's door"
