"""Checks declared with a settings field (`positive_int`, `nonnegative_int`, `number`, `one_of`, `flag`) and run by
`check_fields`, against hand-picked values; and every registered component's settings dataclass declares defaults
that pass them and round-trip through `to_dict` / `from_kwargs`."""

import dataclasses
import math

import pytest

from hf_align.methods import METHODS
from hf_align.regularizers import REGULARIZERS
from hf_align.similarity import SIMILARITIES
from hf_align.utils.checks import (
    check_fields,
    declared_check,
    flag,
    nonnegative_int,
    number,
    one_of,
    positive_int,
)
from hf_align.utils.registry import ComponentConfig


@dataclasses.dataclass
class Plain:
    """A dataclass that is not a ComponentConfig: `check_fields` is called by hand."""

    width: int = positive_int(4)
    size: int | str = positive_int("auto", also=("auto",))
    steps: int = nonnegative_int(0)
    rate: float = number(0.5, low=0.0, high=1.0, high_inclusive=False)
    tau: float = number(0.1, low=0, low_inclusive=False)
    free: float = number(1.0)
    gate: float = number(1.0, low=0.0, low_inclusive=False, expected="a finite number > 0")
    mode: str = one_of("a", ("a", "b"))
    switch: bool = flag(True)
    untouched: str = "anything"


def failure(**values):
    config = Plain(**values)
    with pytest.raises(ValueError) as raised:
        check_fields(config, "plain: ")
    return str(raised.value)


def test_defaults_pass_and_the_declaration_keeps_the_default():
    check_fields(Plain())
    fields = {f.name: f for f in dataclasses.fields(Plain)}
    assert fields["width"].default == 4 and fields["size"].default == "auto"
    assert declared_check(fields["untouched"]) is None
    assert declared_check(fields["width"]).kind == "positive_int"


@pytest.mark.parametrize(
    "values, message",
    [
        ({"width": 0}, "plain: width must be a positive int, got 0"),
        ({"width": -3}, "plain: width must be a positive int, got -3"),
        ({"width": True}, "plain: width must be a positive int, got True"),  # a bool is no int
        ({"width": 2.0}, "plain: width must be a positive int, got 2.0"),
        ({"width": "4"}, "plain: width must be a positive int, got '4'"),
        ({"size": "Auto"}, "plain: size must be a positive int or 'auto', got 'Auto'"),
        ({"size": 0}, "plain: size must be a positive int or 'auto', got 0"),
        ({"steps": -1}, "plain: steps must be an int >= 0, got -1"),
        ({"steps": False}, "plain: steps must be an int >= 0, got False"),
        ({"rate": 1.0}, "plain: rate must be in [0.0, 1.0), got 1.0"),  # the open upper bound
        ({"rate": -0.0001}, "plain: rate must be in [0.0, 1.0), got -0.0001"),
        ({"rate": math.nan}, "plain: rate must be a finite number, got nan"),
        ({"rate": True}, "plain: rate must be a finite number, got True"),
        ({"tau": 0}, "plain: tau must be in (0, inf], got 0"),  # the bounds as declared (an int here)
        ({"free": math.inf}, "plain: free must be a finite number, got inf"),
        ({"free": None}, "plain: free must be a finite number, got None"),
        ({"gate": 0.0}, "plain: gate must be a finite number > 0, got 0.0"),
        ({"gate": math.nan}, "plain: gate must be a finite number > 0, got nan"),
        ({"mode": "c"}, "plain: mode must be one of ('a', 'b'), got 'c'"),
        ({"switch": 1}, "plain: switch must be True or False, got 1"),
    ],
)
def test_a_declared_check_refuses_by_name(values, message):
    assert failure(**values) == message


@pytest.mark.parametrize(
    "values",
    [
        {"width": 1},
        {"size": "auto"},
        {"size": 7},
        {"steps": 0},
        {"rate": 0},
        {"rate": 0.999},
        {"tau": 1e-12},
        {"free": -1e300},
        {"gate": 3},
        {"mode": "b"},
        {"switch": False},
    ],
)
def test_values_at_and_inside_the_bounds_pass(values):
    check_fields(Plain(**values))


def test_a_special_value_matches_by_type_too():
    # 1 == True and 0 == False: an `also` or `one_of` entry must not let a value of another type through
    @dataclasses.dataclass
    class Flags:
        level: int | None = positive_int(None, also=(None,))
        pick: object = one_of(1, (1, 2))

    check_fields(Flags())
    with pytest.raises(ValueError, match=r"^level must be a positive int or None, got False$"):
        check_fields(Flags(level=False))
    with pytest.raises(ValueError, match=r"^pick must be one of \(1, 2\), got True$"):
        check_fields(Flags(pick=True))


def test_a_component_config_runs_its_declarations_on_construction():
    @dataclasses.dataclass
    class Tiny(ComponentConfig):
        check_prefix = "tiny: "
        width: int = positive_int(8)

    assert Tiny().width == 8
    with pytest.raises(ValueError, match=r"^tiny: width must be a positive int, got 0$"):
        Tiny(width=0)
    with pytest.raises(ValueError, match=r"^tiny: width must be a positive int, got 0$"):
        Tiny.from_kwargs("tiny", {"width": 0})
    with pytest.raises(ValueError, match=r"^'tiny' setting width must be an int, got 1\.5$"):  # the type check first
        Tiny.from_kwargs("tiny", {"width": 1.5})
    with pytest.raises(TypeError, match=r"'tiny' got unknown argument\(s\) \['wdth'\]; it accepts \['width'\]"):
        Tiny.from_kwargs("tiny", {"wdth": 3})


COMPONENTS = [
    (kind, name, cls)
    for kind, registry in (("method", METHODS), ("regularizer", REGULARIZERS), ("similarity", SIMILARITIES))
    for name, cls in sorted(registry.items())
]


@pytest.mark.parametrize("kind, name, cls", COMPONENTS, ids=lambda v: v if isinstance(v, str) else "")
def test_every_component_declares_a_settings_dataclass_with_defaults_that_round_trip(kind, name, cls):
    config_class = cls.config_class
    assert dataclasses.is_dataclass(config_class) and issubclass(config_class, ComponentConfig)
    for field in dataclasses.fields(config_class):
        has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
        assert has_default, f"{kind} {name!r}: field {field.name} has no default"
    config = config_class()
    check_fields(config, config_class.check_prefix)  # the defaults pass their own declarations
    values = config.to_dict()
    assert list(values) == [f.name for f in dataclasses.fields(config_class)]
    again = config_class.from_kwargs(name, values)
    assert again == config and again.to_dict() == values


def test_the_similarity_configs_hold_the_heads_settings():
    expected = {
        "cosine": {},
        "dot": {},
        "euclidean": {"scale": 1.0},
        "manhattan": {"scale": 1.0, "max_chunk_elements": 2**25},
        "chi_square": {
            "scale": 1.0,
            "signed": "abs",
            "softmax_temperature": 0.1,
            "eps": 1e-8,
            "max_chunk_elements": 2**25,
        },
        "mlp": {
            "hidden_dim": 256,
            "num_hidden_layers": 1,
            "dropout": 0.0,
            "interaction": False,
            "max_chunk_elements": 2**25,
        },
        "bilinear": {"init": "identity", "init_std": 0.02},
    }
    assert {name: cls.config_class().to_dict() for name, cls in SIMILARITIES.items()} == expected
    head = SIMILARITIES["mlp"](4, hidden_dim=3)  # constructors stay `cls(dim, **settings)`
    assert head.config.hidden_dim == 3 and head.hidden_dim == 3 and head.image_in.out_features == 3
