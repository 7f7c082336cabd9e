"""The registry helper shared by methods, regularisers, similarity heads and CLI commands, and the settings base shared
by method and regulariser configs."""

from dataclasses import dataclass

import pytest
from torch import nn

import hf_align
from hf_align.commands import COMMANDS, CommandSpec
from hf_align.methods import METHODS, MethodConfig, build_method_config, get_method, register_method
from hf_align.methods.linear import LinearAligner, LinearConfig
from hf_align.regularizers import REGULARIZERS, RegularizerConfig, register_regularizer
from hf_align.regularizers.structure import StructureConfig, StructureRegularizer
from hf_align.similarity import SIMILARITIES
from hf_align.utils.registry import ComponentConfig, Registry


class Base:
    pass


class First(Base):
    pass


class Second(Base):
    pass


def test_register_get_and_read_only_mapping_use():
    registry = Registry("widget", Base, name_attribute="widget_name")
    assert registry.register("b", Second) is Second  # returned unchanged: usable as a class decorator
    assert registry.register("a", First) is First
    assert (First.widget_name, Second.widget_name) == ("a", "b")
    assert registry.get("a") is First and registry["b"] is Second
    assert list(registry) == ["b", "a"] and registry.names() == ["a", "b"]  # iteration: registration order
    assert list(registry.items()) == [("b", Second), ("a", First)]
    assert len(registry) == 2 and "a" in registry and "c" not in registry
    assert repr(registry) == "Registry('widget', ['a', 'b'])"
    with pytest.raises(ValueError, match=r"^unknown widget 'c'; registered widgets: \['a', 'b'\]$"):
        registry.get("c")
    with pytest.raises(KeyError):
        registry["c"]
    assert not hasattr(registry, "__setitem__")


def test_a_name_has_one_owner_and_entries_are_checked():
    registry = Registry("widget", Base, name_attribute="widget_name")
    registry.register("a", First)

    class Other(Base):
        pass

    with pytest.raises(
        ValueError,
        match=r"^widget name 'a' is already registered to test_registry\.First; cannot register "
        r"test_registry\.test_a_name_has_one_owner_and_entries_are_checked\.<locals>\.Other under it too$",
    ):
        registry.register("a", Other)
    with pytest.raises(ValueError, match="'a' is already registered to test_registry.First"):
        registry.register("a", First)  # the same class twice is a second registration too
    assert not hasattr(Other, "widget_name")  # a refused class is left untouched
    with pytest.raises(ValueError, match=r"^widget 'x' must be a subclass of Base, got <class 'int'>$"):
        registry.register("x", int)
    with pytest.raises(ValueError, match=r"^widget 'y' must be a subclass of Base, got <test_registry\.First object"):
        registry.register("y", First())
    for name in ("", None, 3):
        with pytest.raises(ValueError, match=rf"^a widget name must be a non-empty str, got {name!r}$"):
            registry.register(name, Second)
    assert registry.names() == ["a"]


def test_a_registry_of_instances():
    registry = Registry("widget", Base, classes=False)
    item = First()
    assert registry.register("a", item) is item and registry.get("a") is item
    with pytest.raises(ValueError, match=r"^widget 'b' must be a Base instance, got <class 'test_registry\.First'>$"):
        registry.register("b", First)
    with pytest.raises(ValueError, match=r"already registered to <test_registry\.First object .*; cannot register"):
        registry.register("a", Second())


# ---------------------------------------------------------------------------------------------- the four registries
def test_methods_regularisers_heads_and_commands_share_the_helper():
    for registry in (METHODS, REGULARIZERS, SIMILARITIES, COMMANDS):
        assert isinstance(registry, Registry)
    assert hf_align.METHODS is METHODS and hf_align.register_method is register_method
    assert METHODS.names() == [
        "asif",
        "attention_pool",
        "codebook",
        "csa",
        "freeze_align",
        "linear",
        "mlp",
        "relative",
        "sail",
        "token_relative",
    ]
    assert get_method("linear") is LinearAligner and LinearAligner.method_name == "linear"
    assert build_method_config("linear", {"projection_dim": 8}) == LinearConfig(projection_dim=8, bias=False)
    with pytest.raises(ValueError, match=r"^unknown method 'linaer'; registered methods: \['asif', "):
        build_method_config("linaer", {})
    assert REGULARIZERS.names() == ["structure"] and StructureRegularizer.regularizer_name == "structure"
    assert COMMANDS.names() == [
        "analyze",
        "benchmark",
        "compare",
        "data-efficiency",
        "evaluate",
        "extract",
        "push",
        "push-features",
        "quickstart",
        "select-layers",
        "train",
    ]
    assert all(isinstance(spec, CommandSpec) and spec.name == name for name, spec in COMMANDS.items())
    assert repr(COMMANDS["train"]) == "CommandSpec('train', run=hf_align.commands.train.run)"


def test_builtin_names_cannot_be_taken_twice():
    class Linear2(LinearAligner):
        pass

    with pytest.raises(ValueError, match=r"method name 'linear' is already registered to hf_align\.methods\.linear\."):
        register_method("linear")(Linear2)
    with pytest.raises(
        ValueError, match=r"regulariser name 'structure' is already registered to .*StructureRegularizer"
    ):
        register_regularizer("structure")(type("Structure2", (StructureRegularizer,), {}))
    with pytest.raises(ValueError, match=r"method 'plain' must be a subclass of AlignerMethod, got <class .*Linear"):
        register_method("plain")(nn.Linear)
    with pytest.raises(ValueError, match=r"command name 'train' is already registered to CommandSpec\('train', run="):
        COMMANDS.register("train", CommandSpec("train", "again", (), print))
    assert METHODS["linear"] is LinearAligner and "plain" not in METHODS and COMMANDS["train"].help != "again"
    assert "method_name" not in vars(Linear2)  # the refused class was not stamped with the name


# ---------------------------------------------------------------------------------------------- settings base
@dataclass
class Sizes(ComponentConfig):
    width: int = 4
    rate: float = 0.5


def test_from_kwargs_checks_names_then_types():
    assert Sizes.from_kwargs("sizes", {"width": 8}) == Sizes(width=8, rate=0.5)
    assert Sizes.from_kwargs("sizes", {"rate": 1}).to_dict() == {"width": 4, "rate": 1}  # an int is a float
    with pytest.raises(
        TypeError, match=r"^'sizes' got unknown argument\(s\) \['depth'\]; it accepts \['rate', 'width'\]$"
    ):
        Sizes.from_kwargs("sizes", {"depth": 2, "width": "8"})  # unknown names are reported first
    with pytest.raises(ValueError, match=r"^'sizes' setting width must be an int, got '8'$"):
        Sizes.from_kwargs("sizes", {"width": "8"})
    with pytest.raises(ValueError, match=r"^'sizes' setting rate must be a finite number, got nan$"):
        Sizes.from_kwargs("sizes", {"rate": float("nan")})


def test_method_and_regulariser_configs_have_their_own_bases_over_one_implementation():
    assert issubclass(MethodConfig, ComponentConfig) and issubclass(RegularizerConfig, ComponentConfig)
    assert issubclass(StructureConfig, RegularizerConfig) and not issubclass(StructureConfig, MethodConfig)
    assert issubclass(LinearConfig, MethodConfig) and not issubclass(LinearConfig, RegularizerConfig)
    implementations = {c.from_kwargs.__func__ for c in (MethodConfig, RegularizerConfig, LinearConfig, StructureConfig)}
    assert implementations == {ComponentConfig.from_kwargs.__func__}
    with pytest.raises(ValueError, match=r"'structure' setting centering must be True or False, got 'yes'"):
        StructureConfig.from_kwargs("structure", {"centering": "yes"})
