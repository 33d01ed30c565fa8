"""What every patch does the same way: probe the target, wrap it, mark it, log the outcome.

A patch module describes its target and its fix and calls :func:`install`; the rules live here:
a patch is installed once per process (a marked target is left alone), only when its probe sees
the bug (a probe that fails because the target changed shape leaves it off, with a warning), the
original stays reachable as ``__wrapped__``, and the outcome is logged under "vllm." so that
vLLM's log handler shows it.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
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


def _label(owner: type | ModuleType) -> str:
    return owner.__name__ if isinstance(owner, ModuleType) else owner.__qualname__
