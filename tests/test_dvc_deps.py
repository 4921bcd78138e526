"""Each DVC stage depends on exactly the code it imports, and the package keeps its import boundaries.

A stage's code is derived from its entry point: the `mhd-uad` command in its `cmd`, i.e. the function the
CLI parser dispatches to (and the CLI helpers it calls), then every `mhd_uad` module those import,
transitively, including imports inside functions (the package imports lazily). Package `__init__` files
run on import, so they count, unless they hold nothing but a docstring and `__version__` (checked here).
`cli.py` itself is the thin dispatcher every command shares: it is no stage's dependency, and nothing
else imports it.

Run this file as a script to print each stage's derived code deps (`python tests/test_dvc_deps.py`).
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = SRC / "mhd_uad"
CLI = PACKAGE / "cli.py"


def module_file(name: str) -> Path | None:
    """The source file of a dotted module name of the package (None for a name that is not a module)."""
    rel = Path(*name.split("."))
    for candidate in (SRC / rel.with_suffix(".py"), SRC / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imported_names(node: ast.AST, current: str) -> set[str]:
    """Dotted module names of mhd_uad imported anywhere below `node` (a `from a import b` counts a.b when that
    is a module, else a)."""
    found: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Import):
            found |= {alias.name for alias in sub.names if alias.name.split(".")[0] == "mhd_uad"}
        elif isinstance(sub, ast.ImportFrom):
            base = sub.module or ""
            if sub.level:  # relative import
                anchor = current.split(".")[: -sub.level] if not module_file(current).name == "__init__.py" \
                    else current.split(".")[: len(current.split(".")) - sub.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "mhd_uad":
                continue
            for alias in sub.names:
                full = f"{base}.{alias.name}"
                found.add(full if module_file(full) else base)
    return found


def _with_packages(names: set[str]) -> set[str]:
    out = set(names)
    for name in names:
        parts = name.split(".")
        out |= {".".join(parts[:i]) for i in range(1, len(parts))}
    return out


@cache
def _imports_of(name: str) -> frozenset[str]:
    path = module_file(name)
    return frozenset(_imported_names(ast.parse(path.read_text()), name))


def closure(start: set[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(_with_packages(start))
    while todo:
        name = todo.pop()
        if name in seen or module_file(name) is None:
            continue
        seen.add(name)
        todo.extend(_with_packages(set(_imports_of(name))))
    return seen


def _cli_functions() -> dict[str, ast.FunctionDef]:
    tree = ast.parse(CLI.read_text())
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}


def command_function(command: str) -> str:
    sys.path.insert(0, str(SRC))
    from mhd_uad.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._subparsers._actions if a.dest == "command")  # noqa: SLF001 (argparse has no API)
    return sub.choices[command].get_default("func").__name__


def entry_modules(command: str) -> set[str]:
    """mhd_uad modules imported by the CLI function of `command`, following the CLI helpers it calls, plus the
    CLI's own module-level imports."""
    functions = _cli_functions()
    names: set[str] = set()
    tree = ast.parse(CLI.read_text())
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            names |= _imported_names(node, "mhd_uad.cli")
    todo, done = [command_function(command)], set()
    while todo:
        fn = todo.pop()
        if fn in done:
            continue
        done.add(fn)
        names |= _imported_names(functions[fn], "mhd_uad.cli")
        todo.extend(c.func.id for c in ast.walk(functions[fn])
                    if isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and c.func.id in functions)
    return names - {"mhd_uad.cli"}


def _is_marker_only(path: Path) -> bool:
    """A package __init__ holding only a docstring and __version__ (importing it runs no logic)."""
    body = ast.parse(path.read_text()).body
    for node in body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue
        if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["__version__"]:
            continue
        return False
    return True


def stage_code(command: str) -> set[str]:
    """Repository-relative files of the code a stage's command runs."""
    files = {module_file(n) for n in closure(entry_modules(command))}
    return {str(f.relative_to(REPO)) for f in files if not (f.name == "__init__.py" and _is_marker_only(f))}


def _stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _definition(stage: dict) -> dict:
    return stage.get("do", stage)


def _command(stage: dict) -> str:
    words = _definition(stage)["cmd"].split()
    assert words[0] == "mhd-uad", words
    return words[1]


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def _code_deps(stage: dict) -> list[str]:
    return [d for d in _definition(stage)["deps"] if d.startswith("src/")]


def _check_stage(name: str, stage: dict) -> None:
    code, deps = stage_code(_command(stage)), _code_deps(stage)
    uncovered = sorted(f for f in code if not _covered(f, deps))
    assert not uncovered, f"{name}: imported but not a dep in dvc.yaml: {uncovered}"
    for dep in deps:
        target = REPO / dep
        files = [str(p.relative_to(REPO)) for p in target.rglob("*.py")] if target.is_dir() else [dep]
        unused = sorted(f for f in files if f not in code and not (f.endswith("__init__.py")
                                                                    and _is_marker_only(REPO / f)))
        assert not unused, f"{name}: dep {dep} covers code the stage never imports: {unused}"


@pytest.mark.parametrize("name", sorted(_stages()))
def test_stage_deps_name_exactly_the_code_the_stage_imports(name):
    _check_stage(name, _stages()[name])


def _readme_stages() -> dict[str, dict]:
    """Optional stages the README tells users to add to dvc.yaml (```yaml blocks of `cmd: mhd-uad ...`)."""
    import re

    stages = {}
    for block in re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S):
        if "cmd: mhd-uad" in block:
            stages.update(yaml.safe_load("stages:\n" + block)["stages"])
    return stages


def test_the_optional_stages_of_the_readme_name_exactly_the_code_they_import():
    stages = _readme_stages()
    assert "ingest" in stages
    for name, stage in stages.items():
        _check_stage(name, stage)


def test_inference_code_reaches_evaluation_only_and_the_score_command_no_stage():
    stages = _stages()
    for name, stage in stages.items():
        code = stage_code(_command(stage))
        assert "src/mhd_uad/evaluation/score.py" not in code, name
        assert ("src/mhd_uad/models/inference.py" in code) == (name in ("evaluate", "score-healthy")), name
    assert "src/mhd_uad/models/unet.py" in stage_code("train")


def _package_imports(path: Path) -> set[str]:
    """Top-level names of every module imported in a file (anywhere in it)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module)
    return names


def test_scoring_is_math_on_arrays_only():
    allowed_third_party = {"numpy", "scipy", "torch"}
    for path in sorted((PACKAGE / "scoring").glob("*.py")):
        for name in _package_imports(path):
            top = name.split(".")[0]
            if top == "mhd_uad":
                assert name in ("mhd_uad.errors",) or name.startswith("mhd_uad.scoring"), (path.name, name)
            else:
                assert top in allowed_third_party or top in sys.stdlib_module_names, (path.name, name)


def test_nothing_imports_the_cli_and_only_tracking_imports_mlflow():
    for path in sorted(PACKAGE.rglob("*.py")):
        names = _package_imports(path)
        assert "mhd_uad.cli" not in names, path
        if path.name != "tracking.py":
            assert not any(n.split(".")[0] == "mlflow" or "MLFlowLogger" in n for n in names), path
            assert "MLFlowLogger" not in path.read_text(), path


def test_the_top_package_marker_holds_no_logic():
    # every stage imports it, so it stays out of the deps only while it runs nothing; other package
    # __init__ files with code are in the closures above and must be deps where they are imported
    assert _is_marker_only(PACKAGE / "__init__.py")


def test_no_function_over_80_lines_and_no_file_over_600():
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        assert text.count("\n") <= 600, f"{path}: {text.count(chr(10))} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                assert length <= 80, f"{path}:{node.lineno} {node.name} has {length} lines"


if __name__ == "__main__":
    for stage_name, stage_def in sorted(_stages().items()):
        print(f"{stage_name} (mhd-uad {_command(stage_def)}):")
        for file in sorted(stage_code(_command(stage_def))):
            print(f"  - {file}")
