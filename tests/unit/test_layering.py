"""The package's layering (megatron_longvita.LAYERS), checked on the source with `ast`.

Every import of a megatron_longvita module, at module level or inside a function, must go
to the importer's layer or an earlier one, and no chain of such imports may come back to
where it started. Unknown sub-packages fail: a new one is declared in LAYERS first.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_longvita import LAYERS

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "megatron_longvita"
LAYER_OF = {part: index for index, parts in enumerate(LAYERS) for part in parts}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported megatron_longvita module
    where: str  # file:line


def _module_files() -> dict[str, Path]:
    """Dotted module name -> file, for the package, the patches and the tools scripts."""
    files: dict[str, Path] = {}
    roots = ((ROOT / PACKAGE, PACKAGE), (ROOT / "patches", f"{PACKAGE}.patches"), (ROOT / "tools", "tools"))
    for directory, dotted in roots:
        for path in sorted(directory.rglob("*.py")):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([dotted, *parts])] = path
    return files


def _part(module: str) -> str:
    """The LAYERS entry a module belongs to ('' for the package root)."""
    if module.startswith("tools"):
        return "tools"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(module: str, path: Path, modules: set[str]) -> list[Import]:
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = []

    def add(target: str, node: ast.AST) -> None:
        if target == PACKAGE or not target.startswith(PACKAGE + "."):
            return
        while target not in modules and "." in target:  # `from pkg import name`: the module is pkg
            target = target.rpartition(".")[0]
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        found.append(Import(module, target, f"{shown}:{node.lineno}"))

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # a name may be a submodule: `from . import npu`
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base, node)
    return found


@functools.cache
def _graph() -> tuple[dict[str, Path], list[Import]]:
    files = _module_files()
    modules = set(files)
    edges = [edge for module, path in files.items() for edge in _imports(module, path, modules)]
    return files, edges


def _layer_name(part: str) -> str:
    return f"{part!r} (layer {LAYER_OF[part]}: {', '.join(LAYERS[LAYER_OF[part]])})"


def test_every_module_is_declared_in_a_layer() -> None:
    files, _ = _graph()
    unknown = [
        f"{path.relative_to(ROOT)}: {_part(module)!r} is in no layer of megatron_longvita.LAYERS"
        for module, path in files.items()
        if _part(module) and _part(module) not in LAYER_OF
    ]
    assert not unknown, "\n".join(unknown)


def test_no_module_imports_a_later_layer() -> None:
    _, edges = _graph()
    violations = []
    for edge in edges:
        source, target = _part(edge.source), _part(edge.target)
        if source in LAYER_OF and target in LAYER_OF and LAYER_OF[target] > LAYER_OF[source]:
            violations.append(
                f"{edge.where}: {edge.source} ({_layer_name(source)}) imports {edge.target} ({_layer_name(target)})"
            )
    assert not violations, "lower layers import higher ones:\n" + "\n".join(violations)


def test_no_import_cycles() -> None:
    """Tarjan's strongly connected components over module-level and function-level imports."""
    files, edges = _graph()
    successors: dict[str, list[Import]] = {module: [] for module in files}
    for edge in edges:
        if edge.target != edge.source:
            successors[edge.source].append(edge)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for edge in successors[module]:
            if edge.target not in index:
                visit(edge.target)
                low[module] = min(low[module], low[edge.target])
            elif edge.target in stack:
                low[module] = min(low[module], index[edge.target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for module in files:
        if module not in index:
            visit(module)
    cycles = []
    for component in components:
        inside = [
            f"  {e.where}: {e.source} imports {e.target}"
            for m in component
            for e in successors[m]
            if e.target in component
        ]
        cycles.append(f"cycle among {', '.join(component)}:\n" + "\n".join(inside))
    assert not cycles, "\n".join(cycles)


def test_checker_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    """The checker itself: an import inside a function and a relative import are edges."""
    source = tmp_path / "mod.py"
    source.write_text("from . import npu\n\n\ndef f():\n    from megatron_longvita.training.loop import x\n")
    modules = {f"{PACKAGE}.patches", f"{PACKAGE}.patches.npu", f"{PACKAGE}.patches.mod", f"{PACKAGE}.training.loop"}
    edges = {(e.target, e.where.rsplit(":", 1)[1]) for e in _imports(f"{PACKAGE}.patches.mod", source, modules)}
    assert edges == {(f"{PACKAGE}.patches.npu", "1"), (f"{PACKAGE}.training.loop", "5")}


def test_checkpoint_mapping_loads_no_media_decoders() -> None:
    """The conversion table must not drag in the data stack (PIL, PyAV) through the model configs."""
    code = (
        "import sys, megatron_longvita.checkpoint.mapping; "
        "print(' '.join(m for m in ('PIL', 'av') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"importing checkpoint.mapping loaded {result.stdout.strip()}"
