"""What an `AlignerConfig` names (a method, a similarity head, regularisers), looked up in their registries and
validated once per model, and how `AlignerModel.from_encoders` keywords become config fields.

`AlignerModel` builds from an `AlignerParts`: `from_encoders` / `from_feature_dims` resolve one with `aligner_settings`
before loading anything (so a typo fails before a download) and hand it to the model; a model built from a config
alone (`from_pretrained`) resolves it with `resolve_parts`. Either way each check runs once.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .configuration import AlignerConfig, check_pooling
from .methods import AlignerMethod, MethodConfig, get_method
from .regularizers import build_regularizers, split_regularizer_kwargs
from .similarity import check_similarity


@dataclass(frozen=True)
class AlignerParts:
    """What an aligner's config names, looked up and validated: the method class and its settings, the similarity
    head class, and the regularisers (already built: they need no layer width)."""

    method: type[AlignerMethod]
    method_config: MethodConfig
    similarity: type[nn.Module]
    regularizers: nn.ModuleDict


def check_parts(
    method_cls: type[AlignerMethod],
    method_settings: dict,
    similarity: str,
    similarity_config: dict | None,
    regularizers: dict,
    vision_pooling: str,
    text_pooling: str,
) -> AlignerParts:
    """Every configuration check that needs no encoder: the settings of the method (already looked up by name), the
    head and the regularisers (names, types, ranges), and whether they and the poolings fit together.

    Raises `ValueError` or `TypeError` naming the setting.
    """
    method = method_cls.method_name
    method_config = method_cls.config_class.from_kwargs(method, method_settings)
    similarity_cls = check_similarity(similarity, method_cls, similarity_config)
    modules = build_regularizers(regularizers)
    for name, regularizer in modules.items():
        if method_cls.input_kind not in regularizer.input_kinds:
            raise ValueError(
                f"regulariser {name!r} works on {' or '.join(regularizer.input_kinds)} features, but method "
                f"{method!r} takes {method_cls.input_kind} features"
            )
    wants_tokens = method_cls.input_kind == "tokens"
    for modality, pooling in (("vision", vision_pooling), ("text", text_pooling)):
        if wants_tokens != (pooling == "tokens"):
            raise ValueError(
                f"method {method!r} needs {modality}_pooling={'tokens' if wants_tokens else 'cls or mean'}, "
                f"got {pooling!r}"
            )
    return AlignerParts(method_cls, method_config, similarity_cls, modules)


def resolve_parts(config: AlignerConfig) -> AlignerParts:
    """The validated parts of a config (`check_parts` on its fields)."""
    return check_parts(
        get_method(config.method),
        config.method_config,
        config.similarity,
        config.similarity_config,
        config.regularizers,
        config.vision_pooling,
        config.text_pooling,
    )


def aligner_settings(method: str, vision_pooling: str, text_pooling: str, kwargs: dict) -> tuple[dict, AlignerParts]:
    """Sort `from_encoders`-style keywords into `AlignerConfig` fields and validate them (`check_parts`).

    Returns the fields (all but the encoder ones) and the validated parts, which the model then builds from.
    """
    kwargs = dict(kwargs)
    settings = {
        "similarity": kwargs.pop("similarity", "cosine"),
        "similarity_config": kwargs.pop("similarity_config", None),
        "contrastive_temperature": kwargs.pop("temperature", 0.05),
        "learnable_temperature": kwargs.pop("learnable_temperature", False),
    }
    regularizers, method_kwargs = split_regularizer_kwargs(kwargs, kwargs.pop("regularizers", None))
    method_cls = get_method(method)
    if method_cls.input_kind == "tokens":
        vision_pooling = "tokens" if vision_pooling == "auto" else vision_pooling
        text_pooling = "tokens" if text_pooling == "auto" else text_pooling
    vision_pooling = check_pooling("vision_pooling", vision_pooling)
    text_pooling = check_pooling("text_pooling", text_pooling)
    parts = check_parts(
        method_cls,
        method_kwargs,
        settings["similarity"],
        settings["similarity_config"],
        regularizers,
        vision_pooling,
        text_pooling,
    )
    settings.update(
        method=method,
        method_config=parts.method_config.to_dict(),
        regularizers=regularizers,
        vision_pooling=vision_pooling,
        text_pooling=text_pooling,
    )
    return settings, parts


__all__ = ["AlignerParts", "aligner_settings", "check_parts", "resolve_parts"]
