"""What an `AlignerConfig` names (a method, a similarity head, regularisers), looked up in their registries and
validated once per model, and how `AlignerModel.from_encoders` keywords become config fields (`aligner_settings`;
`tap_fields` for what the aligner reads from each encoder, once the encoder is probed).

`AlignerModel` builds from an `AlignerParts`: `from_encoders` / `from_feature_dims` resolve one with `aligner_settings`
before loading anything (so a typo fails before a download) and hand it to the model; a model built from a config
alone (`from_pretrained`) resolves it with `resolve_parts`. Either way each check runs once.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..encoders.taps import AUTO, SOURCES, Tap, resolve_tap, tap_width
from ..methods import AlignerMethod, MethodConfig, get_method
from ..regularizers import build_regularizers, split_regularizer_kwargs
from ..similarity.registry import check_similarity
from ..utils.safe_loading import (
    DOWNLOAD_KWARGS,
    LOADING_KWARGS,
    SAFE_WEIGHTS,
    SAFE_WEIGHTS_INDEX,
    check_loading_info,
    shape_mismatches,
    weight_shapes,
)
from .configuration import AlignerConfig, check_pooling


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
    if modules and not method_cls.trainable:
        # A training-free method runs no training step, so the term would silently never apply.
        raise ValueError(
            f"method {method!r} is training-free (trainable=False: training only runs its fit, init_from_data), so "
            f"the regulariser(s) {sorted(modules)} would never apply; drop them (csa composes STRUCTURE inside its "
            "fit: refine_weight and the other refine_* settings)"
        )
    for name, regularizer in modules.items():
        # a token method may pool its tokens for the regularisers (`AlignerMethod.regularizer_features`)
        if (method_cls.regularizer_input_kind or method_cls.input_kind) not in regularizer.input_kinds:
            raise ValueError(
                f"regulariser {name!r} works on {' or '.join(regularizer.input_kinds)} features, but method "
                f"{method!r} takes {method_cls.input_kind} features"
            )
    wants_tokens = method_cls.input_kind == "tokens"
    for modality, pooling in (("vision", vision_pooling), ("text", text_pooling)):
        if wants_tokens != (pooling == "tokens"):
            needed = "tokens" if wants_tokens else "a pooling of one vector per input (not tokens)"
            raise ValueError(f"method {method!r} needs {modality}_pooling={needed}, got {pooling!r}")
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


@dataclass(frozen=True)
class AlignerChoices:
    """The aligner's components as `from_encoders` / `from_feature_dims` take them, by name.

    Attributes:
        method_config: the method's settings, as a dict or its settings dataclass (`hf_align.methods`); settings may
            also be given as keywords, but not one setting both ways.
        regularizers: settings by regulariser name, e.g. `{"structure": {"weight": 10.0}}` (`hf_align.regularizers`).
        similarity: the similarity head's name (`hf_align.similarity`).
        similarity_config: the head's settings.
        structure_weight: shorthand for `regularizers={"structure": {"weight": ...}}` (the one regulariser setting
            with a keyword of its own); `None`: not given.
    """

    method_config: dict | MethodConfig | None = None
    regularizers: dict[str, dict[str, Any]] | None = None
    similarity: str = "cosine"
    similarity_config: dict | None = None
    structure_weight: float | str | None = None


def aligner_settings(
    method: str, vision_pooling: str, text_pooling: str, kwargs: dict, choices: AlignerChoices | None = None
) -> tuple[dict, AlignerParts]:
    """Sort `from_encoders`-style keywords into `AlignerConfig` fields and validate them (`check_parts`).

    `choices` holds the explicit arguments (`method_config`, `regularizers`, `similarity`, `similarity_config`,
    `structure_weight`); `kwargs` the rest: `temperature`, `learnable_temperature`, the method's own settings, and
    `<regulariser>_<field>` keywords, routed to a regulariser only when they name one of its fields and not one of the
    method's (`split_regularizer_kwargs`). Returns the fields (all but the encoder ones) and the validated parts,
    which the model then builds from.
    """
    choices = choices or AlignerChoices()
    kwargs = dict(kwargs)
    settings = {
        "similarity": choices.similarity,
        "similarity_config": choices.similarity_config,
        "contrastive_temperature": kwargs.pop("temperature", 0.05),
        "learnable_temperature": kwargs.pop("learnable_temperature", False),
    }
    method_cls = get_method(method)
    method_fields = {f.name for f in dataclasses.fields(method_cls.config_class)}
    regularizers, method_kwargs = split_regularizer_kwargs(kwargs, choices.regularizers, reserved=method_fields)
    if choices.structure_weight is not None:
        structure = regularizers.setdefault("structure", {})
        if "weight" in structure:
            raise ValueError(
                f"structure_weight={choices.structure_weight!r} and regularizers['structure']['weight']="
                f"{structure['weight']!r} both set setting 'weight' of regulariser 'structure': give it one way only"
            )
        structure["weight"] = choices.structure_weight
    method_kwargs = _with_method_config(method, method_cls, choices.method_config, method_kwargs)
    if method_cls.input_kind == "tokens":  # a token method reads whole sequences: that is what `auto` means for it
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


def check_source_request(modality: str, layer: int | str, source: Any) -> None:
    """Check a `from_encoders` `<modality>_source` before anything is loaded.

    Raises:
        ValueError: an unknown source, `sentence_embedding` for vision, or a source after the last layer with
            `<modality>_layer="auto"` (layer selection chooses among hidden states).
    """
    allowed = (AUTO, *(s for s in SOURCES if modality == "text" or s != "sentence_embedding"))
    if source not in allowed:
        raise ValueError(f"{modality}_source must be one of {allowed}, got {source!r}")
    if layer == AUTO and source not in (AUTO, "hidden_states"):
        raise ValueError(
            f"{modality}_layer='auto' selects among the encoder's hidden states: {modality}_source must be 'auto' or "
            f"'hidden_states', got {source!r}"
        )


def tap_fields(
    modality: str,
    info,
    layer: int | str,
    source: str,
    pooling: str,
    tokens: bool,
    num_prefix_tokens: int | None = None,
) -> tuple[Tap, dict[str, Any]]:
    """Resolve what the aligner reads from a probed encoder (`hf_align.encoders.taps.resolve_tap`) and the config
    fields that record it.

    Args:
        modality (`str`): `"vision"` or `"text"`.
        info (`EncoderInfo`): the probed encoder.
        layer / source / pooling: the `from_encoders` keywords (`"auto"` allowed). With `layer="auto"` the tap reads
            hidden states, pooled as `auto` pools them (resolved at layer 0: every layer pools alike); the layer and
            width are set by layer selection (`AlignerModel.set_layers`).
        tokens (`bool`): the method takes token sequences.
        num_prefix_tokens (`int`, *optional*): vision only: overrides the probed count of leading CLS / register
            tokens of the tapped sequence.

    Returns:
        `(tap, fields)`: the tap (at layer 0 for `"auto"`) and `<modality>_layer`, `_source`, `_pooling`,
        `_hidden_size`, `_num_layers` (+ `vision_has_cls`, `vision_num_prefix_tokens`).
    """
    if layer == AUTO:
        tap = resolve_tap(info, modality, 0, "hidden_states", pooling, tokens)
        # Built for the last hidden state's width; once layer selection has picked a layer, `set_layers` records
        # that layer's width and rebuilds the aligner when it differs.
        width = info.hidden_sizes[-1]
    else:
        tap = resolve_tap(info, modality, layer, source, pooling, tokens)
        width = tap_width(info, tap)
    fields = {
        f"{modality}_layer": layer if layer == AUTO else tap.layer,
        f"{modality}_source": tap.source,
        f"{modality}_pooling": tap.pooling,
        f"{modality}_hidden_size": width,
        f"{modality}_num_layers": info.num_hidden_states,
    }
    if modality == "vision":
        probed = info.num_prefix_tokens.get(tap.source, 0)
        fields["vision_has_cls"] = info.has_cls
        fields["vision_num_prefix_tokens"] = probed if num_prefix_tokens is None else num_prefix_tokens
    return tap, fields


__all__ = ["AlignerParts", "aligner_settings", "check_parts", "check_source_request", "resolve_parts", "tap_fields"]


def check_weights_fit_config(model_class, path: str | os.PathLike, kwargs: dict) -> AlignerParts | None:
    """Refuse, before any tensor is created, an aligner whose config.json asks for tensors its safetensors weights do
    not have (a missing key, another shape: a huge `projection_dim` with small weights would otherwise be allocated
    by transformers before it notices).

    The model is built on the meta device (shapes only) and compared with the weights' headers. Weights that cannot be
    found are left to `from_pretrained`, which reports them in its own words. Returns the config's validated parts,
    for the model `from_pretrained` builds next (so each check runs once), or `None` when nothing was checked or
    `kwargs` override config fields (transformers applies those to the config it builds, which then validates them).
    """
    download = {k: kwargs[k] for k in DOWNLOAD_KWARGS if k in kwargs}
    variant = kwargs.get("variant")
    filename = f"model.{variant}.safetensors" if variant else SAFE_WEIGHTS
    index = f"model.safetensors.index.{variant}.json" if variant else SAFE_WEIGHTS_INDEX
    files = weight_shapes(path, filename, index, **download)
    if files is None:
        return None
    config = kwargs.get("config")
    if not isinstance(config, model_class.config_class):
        config = model_class.config_class.from_pretrained(config or path, **download)
    parts = resolve_parts(config)
    with torch.device("meta"):
        model = model_class(config, _parts=parts)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    found = {name: shape for shapes in files.values() for name, shape in shapes.items()}
    check_loading_info(", ".join(files), shape_mismatches(expected, found))
    return parts if set(kwargs) <= LOADING_KWARGS else None


def _with_method_config(method: str, method_cls, method_config, keywords: dict) -> dict:
    """`method_config` (a dict or the method's settings dataclass) merged with the method's keyword settings."""
    if method_config is None:
        return keywords
    if isinstance(method_config, method_cls.config_class):
        given = method_config.to_dict()
    elif isinstance(method_config, dict):
        given = dict(method_config)
    else:
        raise ValueError(
            f"method_config must be a dict of {method!r}'s settings or a {method_cls.config_class.__name__}, "
            f"got {method_config!r}"
        )
    both = sorted(set(given) & set(keywords))
    if both:
        raise ValueError(f"{both} given both in method_config and as keywords: give each setting one way only")
    return {**given, **keywords}
