"""Read a vLLM release's Python source without installing or importing it (an installed tree or a
wheel file), and answer "does ``from MODULE import NAME`` resolve there?" by parsing it."""

from __future__ import annotations

import ast
import functools
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIRS = ("vllm_ernie_moe", "patches")
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class VllmImport:
    where: str  # file:line in this project
    module: str
    name: str | None  # None: ``import module``


def package_imports() -> Iterator[VllmImport]:
    """Every ``from vllm... import X`` and ``import vllm...`` in the package, lazy ones too."""
    for directory in PACKAGE_DIRS:
        for path in sorted((ROOT / directory).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vllm":
                    for alias in node.names:
                        yield VllmImport(where, node.module, alias.name)
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        if alias.name.split(".")[0] == "vllm":
                            yield VllmImport(where, alias.name, None)


class VllmSource:
    """The ``vllm/`` package of one release; files (``vllm/a/b.py``) are read when needed."""

    def __init__(self, label: str, names: set[str], read: Callable[[str], str]):
        self.label = label
        self.names = names
        self.read = read

    @classmethod
    def from_wheel(cls, wheel: Path) -> VllmSource:
        archive = zipfile.ZipFile(wheel)
        names = {n for n in archive.namelist() if n.startswith("vllm/") and n.endswith(".py")}
        return cls(wheel.name, names, lambda name: archive.read(name).decode())

    @classmethod
    def from_directory(cls, package_dir: Path, label: str) -> VllmSource:
        root = package_dir.parent
        names = {str(p.relative_to(root)) for p in package_dir.rglob("*.py")}
        return cls(label, names, lambda name: (root / name).read_text())

    def module_file(self, module: str) -> str | None:
        base = module.replace(".", "/")
        return next((f for f in (f"{base}.py", f"{base}/__init__.py") if f in self.names), None)

    @functools.cache  # noqa: B019  (a handful of sources per test session)
    def tree(self, module: str) -> ast.Module | None:
        file = self.module_file(module)
        return ast.parse(self.read(file)) if file else None

    def _absolute(self, module: str, node: ast.ImportFrom) -> str:
        """The absolute module name of ``from ... import`` inside ``module``."""
        if not node.level:
            return node.module or ""
        parts = module.split(".")
        if not self.module_file(module).endswith("__init__.py"):
            parts = parts[:-1]
        if node.level > 1:
            parts = parts[: -(node.level - 1)]
        return ".".join(parts + ([node.module] if node.module else []))

    def definition(self, module: str, name: str, depth: int = 0) -> ast.AST | str | None:
        """The AST node defining ``module.name`` (following re-exports and vLLM's lazy
        ``MODULE_ATTRS`` tables), ``"module"`` for a submodule, ``"external"`` for a name
        re-exported from outside vLLM; None when it does not exist."""
        if self.module_file(f"{module}.{name}"):
            return "module"
        tree = self.tree(module)
        if tree is None or depth > 12:
            return None
        for node in _top_level(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if node.name == name:
                    return node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = {t.id for t in targets if isinstance(t, ast.Name)}
                names |= {
                    e.id
                    for t in targets
                    if isinstance(t, ast.Tuple)
                    for e in t.elts
                    if isinstance(e, ast.Name)
                }
                if name in names:
                    return node
            elif isinstance(node, ast.ImportFrom):
                source = self._absolute(module, node)
                for alias in node.names:
                    if alias.name == "*" and source.startswith("vllm"):
                        found = self.definition(source, name, depth + 1)
                        if found is not None:
                            return found
                    elif (alias.asname or alias.name) == name:
                        if not source.startswith("vllm"):
                            return "external"
                        return self.definition(source, alias.name, depth + 1)
            elif isinstance(node, ast.Import):
                if any((a.asname or a.name.split(".")[0]) == name for a in node.names):
                    return "external"
        return self._lazy_attribute(tree, module, name, depth)

    def _lazy_attribute(self, tree: ast.Module, module: str, name: str, depth: int):
        """vLLM's ``__init__`` modules export names lazily: a module ``__getattr__`` that names
        it (``vllm.platforms.current_platform``), or ``{"LLM": ".entrypoints.llm:LLM"}``."""
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
                if any(isinstance(c, ast.Constant) and c.value == name for c in ast.walk(node)):
                    return node
        for node in ast.walk(tree):
            if not isinstance(node, ast.Dict):
                continue
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == name:
                    if isinstance(value, ast.Constant) and ":" in str(value.value):
                        target, attribute = str(value.value).split(":")
                        if target.startswith("."):
                            target = module + target
                        return self.definition(target, attribute, depth + 1)
        return None

    def resolves(self, item: VllmImport) -> bool:
        if item.name is None:
            return self.module_file(item.module) is not None
        return self.definition(item.module, item.name) is not None

    def method(self, module: str, dotted: str) -> ast.FunctionDef | ast.ClassDef | None:
        """``Class.method``, ``function`` or ``Class`` defined in ``module`` (methods: the class's
        own body only)."""
        head, _, method = dotted.partition(".")
        node = self.definition(module, head)
        if not method:
            return node if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else None
        if not isinstance(node, ast.ClassDef):
            return None
        return next(
            (f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == method), None
        )

    def source_of(self, module: str, dotted: str) -> str | None:
        """The code of ``module.dotted`` (unparsed from its AST)."""
        node = self.method(module, dotted)
        return ast.unparse(node) if node is not None else None


def _top_level(tree: ast.Module) -> Iterator[ast.stmt]:
    """Module-level statements, looking inside top-level ``if``/``try`` blocks (not inside
    ``if TYPE_CHECKING:``: those names do not exist at run time)."""
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from node.orelse
        elif isinstance(node, ast.If):
            yield from node.body
            yield from node.orelse
        elif isinstance(node, ast.Try):
            yield from node.body
            for handler in node.handlers:
                yield from handler.body
            yield from node.orelse
        else:
            yield node
