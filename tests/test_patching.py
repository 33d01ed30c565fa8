"""The patches' common helper (``patches/patching.py``): a target is replaced only when its probe
sees the bug, once, in every module that holds it, with the original kept; a probe that no longer
fits the target leaves it alone."""

import sys
import types

import pytest

from vllm_ernie_moe.patches import patching


@pytest.fixture
def target(monkeypatch):
    """A module ``owner`` with ``f`` (returns 1), imported by a second module ``importer``."""

    def f() -> int:
        return 1

    owner, importer = types.ModuleType("owner"), types.ModuleType("importer")
    owner.f = importer.f = f
    monkeypatch.setitem(sys.modules, "importer", importer)
    return owner, importer, f


def plus_one(original):
    return lambda: original() + 1


def test_installs_once_everywhere_and_keeps_the_original(target):
    owner, importer, f = target
    assert patching.install("p", owner, "f", plus_one, bug_present=lambda g: g() == 1,
                            importers=["importer"])  # fmt: skip
    assert owner.f() == 2 and importer.f is owner.f
    assert patching.is_patched(owner.f) and patching.unpatched(owner.f) is f
    assert patching.install("p", owner, "f", plus_one)  # already patched: unchanged
    assert owner.f() == 2


@pytest.mark.parametrize("probe", [lambda g: False, lambda g: g(42)], ids=["no bug", "changed"])
def test_leaves_the_target_when_the_probe_sees_no_bug_or_fails(target, probe):
    owner, _, f = target
    assert not patching.install("p", owner, "f", plus_one, bug_present=probe)
    assert owner.f is f and not patching.is_patched(owner.f)


def test_a_classmethod_stays_one_and_keeps_the_class_of_the_call():
    class Base:
        @classmethod
        def name(cls) -> str:
            return cls.__name__

    class Sub(Base):
        pass

    original = Base.__dict__["name"].__func__

    def shouted(function):
        return lambda cls: function(cls).upper()

    assert patching.install("p", Base, "name", shouted, bug_present=lambda g: g() == "Base")
    assert Base.name() == "BASE" and Sub.name() == "SUB" and Sub().name() == "SUB"
    assert isinstance(Base.__dict__["name"], classmethod)
    assert patching.is_patched(Base.name) and patching.unpatched(Base.name) is original
    assert patching.install("p", Base, "name", shouted)  # already patched: unchanged
    assert Sub.name() == "SUB"


def test_when_imported_applies_right_after_the_import_or_at_once(tmp_path, monkeypatch):
    (tmp_path / "later_target.py").write_text("def f():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "later_target", raising=False)
    applied = []

    def apply(module) -> bool:
        applied.append(module.f())  # the module's code has run
        return patching.install("p", module, "f", plus_one)

    assert patching.when_imported("later_target", apply) is None
    assert patching.when_imported("later_target", apply) is None  # apply_all runs again
    patching.when_imported("later_target", lambda module: applied.append("another patch"))
    assert applied == []  # nothing imported it
    import later_target

    assert applied == [1, "another patch"] and later_target.f() == 2
    assert later_target.__loader__.get_source("later_target").startswith("def f")
    assert not any(getattr(f, "module_name", "") == "later_target" for f in sys.meta_path)
    assert patching.when_imported("later_target", apply) is True  # imported: at once
    assert applied == [1, "another patch", 2]


def test_a_patch_that_fails_after_the_import_leaves_the_import(tmp_path, monkeypatch):
    (tmp_path / "failing_target.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "failing_target", raising=False)

    def apply(module) -> bool:
        raise RuntimeError("the target changed")

    patching.when_imported("failing_target", apply)
    import failing_target

    assert failing_target.VALUE == 1
