"""The one table of moved paths (`hf_align.utils.deprecation`): every old path still gives the same object as the new
one, with a `FutureWarning` that names the new path and the release that removes the old one."""

import importlib
import re
import sys
import warnings

import pytest
import torch

import hf_align
from hf_align.utils.deprecation import MOVED_METHODS, MOVED_MODULES, MOVED_NAMES

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


# Each deprecated method: (its call, its replacement's call), both on (model, processor inputs).
_METHOD_CALLS = {
    "hf_align.AlignerModel.text_hidden_states": (
        lambda model, x: model.text_hidden_states(x["input_ids"], x["attention_mask"], x["token_type_ids"]),
        lambda model, x: model.text_outputs(x["input_ids"], x["attention_mask"], x["token_type_ids"]).hidden_states,
    ),
    "hf_align.AlignerModel.vision_hidden_states": (
        lambda model, x: model.vision_hidden_states(x["pixel_values"]),
        lambda model, x: model.vision_outputs(x["pixel_values"]).hidden_states,
    ),
}


@pytest.mark.parametrize("old", sorted(MOVED_METHODS))
def test_a_deprecated_method_warns_and_returns_what_its_replacement_does(old, tiny_vit, tiny_bert, random_images):
    assert set(_METHOD_CALLS) == set(MOVED_METHODS), "every deprecated method needs its calls in _METHOD_CALLS"
    module, owner, name = old.rsplit(".", 2)
    new, removed_in = MOVED_METHODS[old]
    model = getattr(importlib.import_module(module), owner).from_encoders(tiny_vit, tiny_bert, projection_dim=8)
    assert getattr(type(model), name).__name__ == name  # the wrapper keeps the method's own name (and docstring)
    inputs = model.processor(images=random_images[:2], text=["a cat", "two dogs on a sofa"])
    call, replacement = _METHOD_CALLS[old]
    with pytest.warns(FutureWarning, match=re.escape(_WARNING.format(old, removed_in, new))) as caught:
        result = call(model, inputs)
    # one warning per call, pointing at the caller rather than at the wrapper
    assert [w.filename for w in caught if old in str(w.message)] == [__file__]
    expected = replacement(model, inputs)
    assert len(result) == len(expected) > 1
    for got, want in zip(result, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


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
