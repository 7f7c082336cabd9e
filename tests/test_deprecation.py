"""The one table of moved paths (`hf_align.utils.deprecation`): every old path still gives the same object as the new
one, with a `FutureWarning` that names the new path and the release that removes the old one."""

import importlib
import sys
import warnings

import pytest

import hf_align
from hf_align.utils.deprecation import MOVED_MODULES, MOVED_NAMES

_WARNING = r"{} is deprecated and will be removed in hf_align {}; use {} instead"


def _fresh_import(monkeypatch, old: str):
    monkeypatch.delitem(sys.modules, old, raising=False)  # the module's warning is at import
    parent, _, child = old.rpartition(".")
    monkeypatch.delattr(sys.modules[parent], child, raising=False)
    return importlib.import_module(old)


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_a_moved_module_imports_from_its_old_path_with_a_warning(monkeypatch, old):
    new, removed_in = MOVED_MODULES[old]
    with pytest.warns(FutureWarning, match=_WARNING.format(*(s.replace(".", r"\.") for s in (old, removed_in, new)))):
        stand_in = _fresh_import(monkeypatch, old)
    target = importlib.import_module(new)
    public = [n for n in vars(target) if not n.startswith("_") and f"{old}.{n}" not in MOVED_NAMES]
    assert public, f"{new} defines no public name"
    for name in public:
        assert getattr(stand_in, name) is getattr(target, name), f"{old}.{name}"


@pytest.mark.parametrize("old", sorted(MOVED_NAMES))
def test_a_moved_name_is_served_from_its_old_module_with_a_warning(old):
    module, _, name = old.rpartition(".")
    new, removed_in = MOVED_NAMES[old]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # importing a moved module warns on its own
        owner = importlib.import_module(module)
    pattern = _WARNING.format(*(s.replace(".", r"\.") for s in (old, removed_in, f"{new}.{name}")))
    with pytest.warns(FutureWarning, match=pattern):
        value = getattr(owner, name)
    assert value is getattr(importlib.import_module(new), name)


def test_every_new_path_in_the_table_exists_and_no_old_path_does():
    for old, (new, _) in MOVED_MODULES.items():
        assert importlib.util.find_spec(new) is not None, new
        assert not any(spec is not None for spec in (_path_finder_spec(old),)), (
            f"{old} is still a module of its own: the table would hide it"
        )
    for old, (new, _) in MOVED_NAMES.items():
        assert hasattr(importlib.import_module(new), old.rpartition(".")[2]), old


def _path_finder_spec(name: str):
    parent, _, child = name.rpartition(".")
    return importlib.machinery.PathFinder.find_spec(name, importlib.import_module(parent).__path__)


def test_an_unknown_name_is_still_an_attribute_error():
    with pytest.raises(AttributeError, match=r"module 'hf_align' has no attribute 'not_a_name'"):
        hf_align.not_a_name  # noqa: B018
    with pytest.raises(AttributeError, match=r"module 'hf_align.training' has no attribute 'not_a_name'"):
        hf_align.training.not_a_name  # noqa: B018


def test_the_public_api_is_small_and_each_name_resolves():
    assert len(hf_align.__all__) <= 30
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no public name goes through the table
        for name in hf_align.__all__:
            assert getattr(hf_align, name) is not None, name
