"""Name -> component tables (methods, regularisers, similarity heads, CLI commands) and the settings base they share.

A component registers itself with one call in the module that defines it (`@register_method("linear")`,
`@register_regularizer("structure")`, `@register_similarity("cosine")`; a command module's `COMMAND = CommandSpec(...)`
is registered by `hf_align.commands`), and each package `__init__` imports its built-in modules by name, so the import
graph can be read from the source. A name has one owner: registering a second object under it is an error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from .checks import check_fields, check_settings

T = TypeVar("T")


def _describe(obj: Any) -> str:
    """What a duplicate-name error calls an entry: `module.QualName` for a class, the repr of an instance."""
    return f"{obj.__module__}.{obj.__qualname__}" if isinstance(obj, type) else repr(obj)


class Registry(Generic[T]):
    """A read-only name -> object mapping that components add themselves to with `register`.

    Supports `registry[name]` (KeyError when absent), `name in registry`, `len`, iteration over names in
    registration order, `items()` and `names()` (sorted); `get(name)` is the lookup to use on user input.

    Args:
        kind (`str`): what the entries are, in messages (`"method"`, `"similarity"`, ...).
        base (`type`): entries must be subclasses of it (`classes=True`) or instances of it (`classes=False`).
        classes (`bool`): whether the entries are classes.
        name_attribute (`str`, *optional*): attribute set on each entry to the name it is registered under
            (e.g. `"method_name"`), after the checks passed.
        plural (`str`, *optional*): plural of `kind` for messages (default `kind + "s"`).
    """

    def __init__(
        self,
        kind: str,
        base: type,
        *,
        classes: bool = True,
        name_attribute: str | None = None,
        plural: str | None = None,
    ):
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self.base = base
        self.classes = classes
        self.name_attribute = name_attribute
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T) -> T:
        """Add `obj` under `name` and return it unchanged (so `functools.partial(registry.register, name)` is a class
        decorator). Raises `ValueError` for an empty or non-str name, a name that already has an owner (both are
        named), or an object that is not a `base` subclass / instance."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty str, got {name!r}")
        if name in self._entries:
            raise ValueError(
                f"{self.kind} name {name!r} is already registered to {_describe(self._entries[name])}; "
                f"cannot register {_describe(obj)} under it too"
            )
        if self.classes:
            ok = isinstance(obj, type) and issubclass(obj, self.base)
            expected = f"a subclass of {self.base.__name__}"
        else:
            ok = isinstance(obj, self.base)
            expected = f"a {self.base.__name__} instance"
        if not ok:
            raise ValueError(f"{self.kind} {name!r} must be {expected}, got {obj!r}")
        if self.name_attribute is not None:
            setattr(obj, self.name_attribute, name)
        self._entries[name] = obj
        return obj

    def get(self, name: str) -> T:
        """The entry registered as `name`; `ValueError` listing the registered names when there is none."""
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; registered {self.plural}: {self.names()}") from None

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def items(self):
        """(name, entry) pairs in registration order."""
        return self._entries.items()

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


@dataclass
class ComponentConfig:
    """Base of the settings dataclasses of registered components (`MethodConfig`, `RegularizerConfig`,
    `SimilarityConfig`).

    Subclasses are dataclasses that declare each field's check with its default (`hf_align.utils.checks`:
    `projection_dim: int = positive_int(512)`, `dropout: float = number(0.1, low=0.0, high=1.0, high_inclusive=False)`);
    `__post_init__` runs them (`check_fields`), naming the field as `check_prefix + name`. A subclass adds a
    `__post_init__` only for what is no range of one field (a relation between fields), calling
    `super().__post_init__()` first. `from_kwargs` checks names and types before the dataclass is built.
    """

    check_prefix: ClassVar[str] = ""  # how range messages name a field: "asif: " -> "asif: topk must be ..."

    def __post_init__(self):
        check_fields(self, self.check_prefix)

    @classmethod
    def from_kwargs(cls, owner: str, kwargs: dict[str, Any]) -> ComponentConfig:
        """Build from keyword settings; `owner` (the method or regulariser name) is named in errors.

        Raises `TypeError` for a name the dataclass does not have (listing the ones it has) and `ValueError` for a
        value of the wrong type (`hf_align.utils.checks.check_settings`: a recipe's `projection_dim: "512"`) or out
        of its range (the declared checks).
        """
        cls.check_names(owner, kwargs)
        check_settings(owner, cls, kwargs, label=cls.owner_label(owner))
        return cls(**kwargs)

    @classmethod
    def owner_label(cls, owner: str) -> str:
        """How type and bound messages name the owner: `'linear'` (the similarity heads: `similarity 'mlp'`)."""
        return repr(owner)

    @classmethod
    def check_names(cls, owner: str, kwargs: dict[str, Any]) -> None:
        """`TypeError` for keyword settings the dataclass has no field for, listing the ones it has."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(
                f"{owner!r} got unknown argument(s) {unknown}; it accepts {sorted(names) or 'no arguments'}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


__all__ = ["ComponentConfig", "Registry"]
