"""The one table of names and modules that moved, each with the release that removes the old path, and the one
mechanism that serves them: a module `__getattr__` (`module_getattr`) for names that left a module or package that
still exists, and an import hook (`install`) for modules that are gone, whose old path imports as a stand-in that
forwards to the new module; and a decorator (`deprecated_method`) for methods that are going (`MOVED_METHODS`).
All three warn with a `FutureWarning` naming the new path. Only paths that shipped in a release are here; library code
never uses them (tests/test_import_graph.py)."""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

# Moved in 0.2 (the package became folders, one per stage); the old paths go in 0.3.
REMOVED_IN = "0.3"
# old module -> (new module, release that removes the old path)
MOVED_MODULES: dict[str, tuple[str, str]] = {
    "hf_align.analysis": ("hf_align.functional.geometry", REMOVED_IN),
    "hf_align.arguments": ("hf_align.commands.arguments", REMOVED_IN),
    "hf_align.cli": ("hf_align.commands.cli", REMOVED_IN),
    "hf_align.configuration": ("hf_align.model.configuration", REMOVED_IN),
    "hf_align.data_efficiency": ("hf_align.experiments.data_efficiency", REMOVED_IN),
    "hf_align.layer_selection": ("hf_align.training.layer_selection", REMOVED_IN),
    "hf_align.leaderboard": ("hf_align.experiments.compare", REMOVED_IN),
    "hf_align.lora": ("hf_align.encoders.lora", REMOVED_IN),
    "hf_align.losses": ("hf_align.functional.losses", REMOVED_IN),
    "hf_align.metrics": ("hf_align.evaluation.metrics", REMOVED_IN),
    "hf_align.modelcard": ("hf_align.model.card", REMOVED_IN),
    "hf_align.modeling": ("hf_align.model.modeling", REMOVED_IN),
    "hf_align.ot": ("hf_align.functional.ot", REMOVED_IN),
    "hf_align.pipelines": ("hf_align.integrations.pipelines", REMOVED_IN),
    "hf_align.processing": ("hf_align.model.processing", REMOVED_IN),
    "hf_align.quickstart": ("hf_align.experiments.quickstart", REMOVED_IN),
    "hf_align.relative": ("hf_align.functional.relative_representations", REMOVED_IN),
    "hf_align.representation": ("hf_align.functional.representation_similarity", REMOVED_IN),
    "hf_align.retrieval": ("hf_align.functional.retrieval", REMOVED_IN),
    "hf_align.segmentation": ("hf_align.evaluation.segmentation", REMOVED_IN),
    "hf_align.templates": ("hf_align.model.templates", REMOVED_IN),
    "hf_align.trainer_callback": ("hf_align.integrations.trainer", REMOVED_IN),
}
# "old module.name" -> (where the name is public now, release that removes the old path)
MOVED_NAMES: dict[str, tuple[str, str]] = {
    "hf_align.ImageTextCollator": ("hf_align.encoders.lora", REMOVED_IN),
    "hf_align.LayerSelectionReport": ("hf_align.training", REMOVED_IN),
    "hf_align.cka": ("hf_align.functional", REMOVED_IN),
    "hf_align.configuration.check_settings": ("hf_align.utils.checks", REMOVED_IN),
    "hf_align.encoders.as_token_sequence": ("hf_align.encoders.poolings", REMOVED_IN),
    "hf_align.encoders.encoder_revision": ("hf_align.encoders.loading", REMOVED_IN),
    "hf_align.encoders.image_size_of": ("hf_align.encoders.loading", REMOVED_IN),
    "hf_align.encoders.non_finite_rows": ("hf_align.encoders.loading", REMOVED_IN),
    "hf_align.evaluation.class_prototypes": ("hf_align.model.templates", REMOVED_IN),
    "hf_align.evaluation.embed_feature_cache": ("hf_align.evaluation.zero_shot_retrieval", REMOVED_IN),
    "hf_align.evaluation.embed_images": ("hf_align.evaluation.zero_shot_retrieval", REMOVED_IN),
    "hf_align.evaluation.embed_texts": ("hf_align.model.templates", REMOVED_IN),
    "hf_align.evaluation.is_feature_cache": ("hf_align.evaluation.zero_shot_retrieval", REMOVED_IN),
    "hf_align.features_from_tensors": ("hf_align.features", REMOVED_IN),
    "hf_align.log_sinkhorn": ("hf_align.functional", REMOVED_IN),
    "hf_align.modeling.PICKLE_WEIGHTS": ("hf_align.utils.safe_loading", REMOVED_IN),
    "hf_align.mutual_knn": ("hf_align.functional", REMOVED_IN),
    "hf_align.overlay_segmentation": ("hf_align.model", REMOVED_IN),
    "hf_align.record_training_dataset": ("hf_align.model", REMOVED_IN),
    "hf_align.register_pipelines": ("hf_align.integrations", REMOVED_IN),
    "hf_align.relative_representation": ("hf_align.functional", REMOVED_IN),
    "hf_align.resolve_auto_layers": ("hf_align.training", REMOVED_IN),
    "hf_align.retrieval_metrics": ("hf_align.evaluation", REMOVED_IN),
    "hf_align.run_data_efficiency": ("hf_align.experiments.data_efficiency", REMOVED_IN),
    "hf_align.segment_tokens": ("hf_align.model", REMOVED_IN),
    "hf_align.similarity.DEFAULT_MAX_CHUNK_ELEMENTS": ("hf_align.similarity.base", REMOVED_IN),
    "hf_align.sinkhorn": ("hf_align.functional", REMOVED_IN),
    "hf_align.skipped_samples": ("hf_align.features", REMOVED_IN),
    "hf_align.structure_regularizer": ("hf_align.functional", REMOVED_IN),
    "hf_align.symmetric_infonce": ("hf_align.functional", REMOVED_IN),
    "hf_align.training.BatchSource": ("hf_align.training.batches", REMOVED_IN),
    "hf_align.training.CHECKPOINT_PREFIX": ("hf_align.training.checkpoints", REMOVED_IN),
    "hf_align.training.METHOD_STATE_FILE": ("hf_align.training.checkpoints", REMOVED_IN),
    "hf_align.training.STATE_FILE": ("hf_align.training.checkpoints", REMOVED_IN),
    "hf_align.training.evaluate_on_rows": ("hf_align.training.loop", REMOVED_IN),
    "hf_align.training.init_from_training_rows": ("hf_align.training.loop", REMOVED_IN),
    "hf_align.training.split_by_image": ("hf_align.features", REMOVED_IN),
    "hf_align.unbiased_cka": ("hf_align.functional", REMOVED_IN),
    "hf_align.zero_shot_metrics": ("hf_align.evaluation", REMOVED_IN),
}

# "module.Class.method" (as the public API names the class) -> (what to call instead, release that removes the method)
MOVED_METHODS: dict[str, tuple[str, str]] = {
    "hf_align.AlignerModel.text_hidden_states": (
        "AlignerModel.text_outputs(input_ids, attention_mask, token_type_ids).hidden_states",
        REMOVED_IN,
    ),
    "hf_align.AlignerModel.vision_hidden_states": (
        "AlignerModel.vision_outputs(pixel_values).hidden_states",
        REMOVED_IN,
    ),
}


def _warn(old: str, new: str, removed_in: str, stacklevel: int = 4) -> None:
    # stacklevel 4: the code that named the old path, past moved_attribute and the module's __getattr__
    warnings.warn(
        f"{old} is deprecated and will be removed in hf_align {removed_in}; use {new} instead",
        FutureWarning,
        stacklevel=stacklevel,
    )


def moved_attribute(module: str, name: str):
    """The object `module.name` stood for, with the warning; `AttributeError` when the table has no such entry."""
    key = f"{module}.{name}"
    if key in MOVED_NAMES:
        target, removed_in = MOVED_NAMES[key]
        _warn(key, f"{target}.{name}", removed_in)
        return getattr(importlib.import_module(target), name)
    if key in MOVED_MODULES:
        if key in sys.modules:  # else importing it warns
            _warn(key, MOVED_MODULES[key][0], MOVED_MODULES[key][1])
        return importlib.import_module(key)  # the stand-in, so that its moved names warn too
    raise AttributeError(f"module {module!r} has no attribute {name!r}")


def deprecated_method(key: str):
    """Decorator for the method `MOVED_METHODS[key]` describes: each call warns with its replacement, then runs it."""
    new, removed_in = MOVED_METHODS[key]  # a KeyError at import: every deprecated method is in the table

    def decorate(method):
        @functools.wraps(method)
        def deprecated(*args, **kwargs):
            _warn(key, new, removed_in, stacklevel=3)  # 3: the caller, past `deprecated` and `_warn`
            return method(*args, **kwargs)

        return deprecated

    return decorate


def module_getattr(module: str):
    """A module-level `__getattr__` for `module` that serves the table's entries under it."""

    def __getattr__(name: str):
        return moved_attribute(module, name)

    return __getattr__


class _MovedModule(types.ModuleType):
    """What `import <old module>` gives: its attributes come from the new module, or from where the table says."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        key = f"{self.__name__}.{name}"
        if key in MOVED_NAMES:
            return moved_attribute(self.__name__, name)
        return getattr(importlib.import_module(MOVED_MODULES[self.__name__][0]), name)

    def __dir__(self):
        return dir(importlib.import_module(MOVED_MODULES[self.__name__][0]))


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED_MODULES:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        return _MovedModule(spec.name)

    def exec_module(self, module) -> None:
        new, removed_in = MOVED_MODULES[module.__name__]
        _warn(module.__name__, new, removed_in, stacklevel=2)


_FINDER = _MovedModuleFinder()


def install() -> None:
    """Serve the old paths of moved modules (`import hf_align.modeling`); `import hf_align` calls it once."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.append(_FINDER)
