"""What every patch does the same way: probe the target, wrap it, mark it, log the outcome.

A patch module describes its target and its fix and calls :func:`install`; the rules live here:
a patch is installed once per process (a marked target is left alone), only when its probe sees
the bug (a probe that fails because the target changed shape leaves it off, with a warning), the
original stays reachable as ``__wrapped__``, and the outcome is logged under "vllm." so that
vLLM's log handler shows it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterable
from importlib.machinery import ModuleSpec
from types import ModuleType

from vllm.logger import init_logger

logger = init_logger(f"vllm.{__name__}")

MARK = "_vllm_ernie_moe_patch"


def is_patched(function: object) -> bool:
    """Whether ``function`` is one of the plugin's replacements."""
    return getattr(function, MARK, False)


def unpatched(function: Callable) -> Callable:
    """The original behind a replacement, or ``function`` itself."""
    return function.__wrapped__ if is_patched(function) else function  # type: ignore[attr-defined]


def install(
    name: str,
    owner: type | ModuleType,
    attribute: str,
    replacement: Callable[[Callable], Callable],
    *,
    bug_present: Callable[[Callable], bool] | None = None,
    importers: Iterable[str] = (),
    fixed: str = "",
) -> bool:
    """Replace ``owner.attribute`` by ``replacement(original)`` unless already replaced, or unless
    ``bug_present(original)`` (the probe) says the bug is gone; a classmethod by
    ``classmethod(replacement(its function))``. ``importers`` are modules holding
    their own reference to the target, replaced too. ``name`` is the patch module's name for the
    log; ``fixed`` says what the replacement does. True when the patch is active."""
    original = getattr(owner, attribute)
    if is_patched(original):
        return True
    if bug_present is not None:
        try:
            present = bug_present(original)
        except Exception as error:  # the target reads or returns something else now
            logger.warning(
                "%s not applied: %s.%s no longer behaves as its probe expects (%s).",
                name, _label(owner), attribute, error,
            )  # fmt: skip
            return False
        if not present:
            logger.info("%s not needed: %s.%s has no bug.", name, _label(owner), attribute)
            return False
    # A classmethod is replaced as one: the replacement wraps its function, which takes the class
    # the call came through (a subclass keeps its own ``cls``).
    is_classmethod = isinstance(inspect.getattr_static(owner, attribute), classmethod)
    target = original.__func__ if is_classmethod else original
    patched = replacement(target)
    setattr(patched, MARK, True)
    patched.__wrapped__ = target  # type: ignore[attr-defined]
    if is_classmethod:
        setattr(owner, attribute, classmethod(patched))
    for module in (owner, *map(importlib.import_module, importers)):
        if getattr(module, attribute, None) is original:
            setattr(module, attribute, patched)
    logger.info("%s: patched %s.%s%s.", name, _label(owner), attribute, f" ({fixed})" * bool(fixed))
    return True


def when_imported(module_name: str, apply: Callable[[ModuleType], bool]) -> bool | None:
    """Call ``apply(module)`` once ``module_name`` is imported: now if it is (its result), else
    right after the import that loads it (None); once per ``apply``. Why: a patch that imported its
    target's module itself made every process pay for it, the API server too, which never uses some
    of them (vLLM's CPU model runner: 0.06-0.13 s of the plugin's load there,
    docs/results/plugin-load-zen4.txt)."""
    module = sys.modules.get(module_name)
    if module is not None:
        return apply(module)
    if not any(
        isinstance(finder, _ApplyAfterImport)
        and (finder.module_name, finder.apply) == (module_name, apply)
        for finder in sys.meta_path
    ):
        sys.meta_path.insert(0, _ApplyAfterImport(module_name, apply))
    return None


class _ApplyAfterImport(importlib.abc.MetaPathFinder):
    """Finds one module as the other finders do, with a loader that calls ``apply`` after it."""

    def __init__(self, module_name: str, apply: Callable[[ModuleType], bool]) -> None:
        self.module_name, self.apply = module_name, apply

    def find_spec(self, fullname: str, path=None, target=None) -> ModuleSpec | None:
        if fullname != self.module_name:
            return None
        sys.meta_path.remove(self)  # once, and so that the others find it
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _LoaderThenApply(spec.loader, self.apply)
        return spec


class _LoaderThenApply(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, apply: Callable[[ModuleType], bool]) -> None:
        self.loader, self.apply = loader, apply

    def __getattr__(self, name: str):  # get_source, get_filename, ...: the real loader's
        return getattr(self.loader, name)

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        try:
            self.apply(module)
        except Exception:  # the module imported; the patch failed: say so, do not fail vLLM
            logger.exception("Patching %s after its import failed.", module.__name__)


def _label(owner: type | ModuleType) -> str:
    return owner.__name__ if isinstance(owner, ModuleType) else owner.__qualname__
