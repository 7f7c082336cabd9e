"""The API reference's configuration is sound without building it (`.ci/run` builds it with `mkdocs build --strict`):
every page in `mkdocs.yml`'s nav exists, and every `::: hf_align.x` block of a page names something that imports.
The reference leaves out what has no docstring (`show_if_no_docstring: false`), so every class and function that a
documented package exports in `__all__` must have one."""

import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
DOCS = ROOT / CONFIG["docs_dir"]


def _nav_pages(nav):
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            yield from _nav_pages(value)
        else:
            yield value


def _resolve(target):
    """The object a `::: dotted.path` block documents: the longest importable module prefix, then attributes."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(target)


def test_every_nav_page_exists_and_every_api_block_imports():
    pages = list(_nav_pages(CONFIG["nav"]))
    assert "index.md" in pages and "methods.md" in pages and "web_scale.md" in pages
    missing = [page for page in pages if not (DOCS / page).is_file()]
    assert not missing, f"pages in mkdocs.yml's nav that do not exist under {DOCS}: {missing}"

    targets = {}
    for page in pages:
        for target in re.findall(r"^:::\s+(\S+)\s*$", (DOCS / page).read_text(encoding="utf-8"), re.MULTILINE):
            targets[target] = page
    assert {f"hf_align.{p}" for p in ("model", "features", "training", "evaluation", "methods")} <= set(targets)
    for target, page in targets.items():
        assert target.startswith("hf_align"), f"{page}: `::: {target}` is not part of hf_align"
        try:
            _resolve(target)
        except (ImportError, AttributeError) as error:
            raise AssertionError(f"{page}: `::: {target}` does not import: {error!r}") from error


def test_every_exported_class_and_function_has_a_docstring():
    packages = ["hf_align"] + [f"hf_align.{p}" for p in ("model", "encoders", "features", "training", "evaluation")]
    packages += [f"hf_align.{p}" for p in ("integrations", "functional", "methods", "regularizers", "similarity")]
    undocumented = []
    for package in packages:
        module = importlib.import_module(package)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj):
                doc = vars(obj).get("__doc__")  # a class's own docstring, not one inherited from its bases
                if dataclasses.is_dataclass(obj) and (doc or "").startswith(f"{obj.__name__}("):
                    doc = None  # the signature that @dataclass writes where the class has no docstring
            elif inspect.isroutine(obj):
                doc = obj.__doc__
            else:
                continue  # constants and submodules
            if not (doc or "").strip():
                undocumented.append(f"{package}.{name}")
    assert not undocumented, f"exported without a docstring (the API reference would leave them out): {undocumented}"
