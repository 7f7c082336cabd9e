"""Loading the two encoders an `AlignerModel` reads, and checking that they give what its aligner was built on.

`load_requested_encoders` serves `AlignerModel.from_encoders`: it loads and probes each encoder and resolves what the
aligner reads from it into config fields. `reload_encoders` serves `from_pretrained`: for each modality, the encoder
the caller passed, else the one bundled in the aligner's folder, else the one the config records by id and revision,
then their LoRA adapters and the saved processor. `probe_attached` is the check both run through
`AlignerModel.attach_encoders`: the tap's source and width, and a sentence-transformers pipeline if the tap reads one.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import logging

from ..encoders import lora
from ..encoders.loading import EncoderInfo, load_bundled_encoder, load_encoder, probe_text, probe_vision
from ..encoders.sentence_pipeline import SentenceEncoder, SentencePipeline
from ..encoders.taps import AUTO, tap_width
from .aligner_parts import tap_fields
from .configuration import AlignerConfig, resolve_layer_index
from .processing import AlignerProcessor

if TYPE_CHECKING:
    from .modeling import AlignerModel

logger = logging.get_logger(__name__)


def source_name(given: str | PreTrainedModel, model: PreTrainedModel) -> str:
    """What the config records for an encoder: the Hub id, or an absolute path for a local folder."""
    name = given if isinstance(given, str) else (model.name_or_path or "")
    if name and os.path.isdir(name):
        return os.path.abspath(name)
    return name


def load_requested_encoders(
    requests: dict[str, tuple], settings: dict[str, Any], dtype: torch.dtype | str | None, tokens: bool
) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """`from_encoders`' encoders, loaded and probed, and the config fields that record them and their taps.

    Args:
        requests: modality -> `(encoder, revision, layer, source, num_prefix_tokens)` as `from_encoders` got them
            (already checked).
        settings: the aligner's settings from `aligner_settings`; each `<modality>_pooling` is popped from it.
        dtype: the dtype the encoders load in.
        tokens: whether the method reads tokens (its `input_kind`), which decides what `auto` pooling means.

    Returns:
        modality -> encoder, and the `AlignerConfig` fields (encoder ids, revisions, taps, widths, pipeline).
    """
    encoders, fields = {}, {}
    for modality, (given, revision, layer, source, prefix) in requests.items():
        encoder = load_encoder(modality, given, revision, dtype, source=source)
        probe = probe_vision if modality == "vision" else probe_text
        info = probe(encoder, source_name(given, encoder))
        pooling = settings.pop(f"{modality}_pooling")
        tap, tapped = tap_fields(modality, info, layer, source, pooling, tokens, prefix)
        if isinstance(encoder, SentenceEncoder) and tap.source != "sentence_embedding":
            encoder = encoder.model  # the pipeline goes unread: the plain model, as from_pretrained reloads it
        elif tap.source == "sentence_embedding":
            fields["text_pipeline"] = encoder.pipeline.describe()
        encoders[modality] = encoder
        fields.update(tapped)
        fields[f"{modality}_encoder"] = info.name_or_path
        fields[f"{modality}_revision"] = revision or info.revision
    return encoders, fields


def try_load_processor(vision: str, text: str, vision_revision, text_revision) -> AlignerProcessor | None:
    """The `AlignerProcessor` of the two encoders' repos, or `None` (with a warning) when they have none."""
    try:
        return AlignerProcessor.from_encoders(vision, text, vision_revision, text_revision)
    except (OSError, ValueError, TypeError) as err:
        logger.warning(f"could not build an AlignerProcessor for ({vision!r}, {text!r}): {err}")
        return None


def reload_encoders(
    model: AlignerModel,
    path: str | os.PathLike,
    vision_model: PreTrainedModel | None,
    text_model: PreTrainedModel | None,
    revision: str | None,
    dtype: torch.dtype | str | None,
) -> None:
    """Attach to `model`, loaded by `from_pretrained` from `path`, the encoders its config names, their LoRA adapters
    and the processor saved with it (`revision`, `dtype`: `from_pretrained`'s)."""
    config, encoders = model.config, {}
    for modality, given in (("vision", vision_model), ("text", text_model)):
        # The tap's source decides what loads with the model: a CLIP projection, a sentence-transformers pipeline.
        source = getattr(config, f"{modality}_source")
        if given is not None:
            encoders[modality] = load_encoder(modality, given, source=source)
        elif config.bundled_encoders:
            encoders[modality] = load_bundled_encoder(modality, path, revision, dtype, source=source)
        else:
            name, encoder_revision = getattr(config, f"{modality}_encoder"), getattr(config, f"{modality}_revision")
            if name is None:
                raise ValueError(
                    f"the aligner at {path!r} records no {modality}_encoder: pass "
                    f"{modality}_model=, or load_encoders=False for the aligner alone"
                )
            encoders[modality] = load_encoder(modality, name, encoder_revision, dtype, source=source)
    model.attach_encoders(encoders["vision"].to(model.device), encoders["text"].to(model.device))
    lora.load_encoder_lora(model, path, revision=revision)
    try:
        model.processor = AlignerProcessor.from_pretrained(path, revision=revision)
    except (OSError, ValueError, TypeError) as err:
        logger.warning(f"no processor found with the aligner at {path!r}: {err}")


def probe_attached(config: AlignerConfig, vision_model: nn.Module, text_model: nn.Module) -> dict[str, EncoderInfo]:
    """Probe two encoders about to be attached to an aligner of `config`, refusing any whose tap (source, width) or
    sentence-transformers pipeline differs from what the aligner was built on; modality -> what probing found."""
    infos = {
        "vision": probe_vision(vision_model, config.vision_encoder),
        "text": probe_text(text_model, config.text_encoder),
    }
    for modality, info in infos.items():
        expected = getattr(config, f"{modality}_hidden_size")
        width = tapped_width(config, modality, info)
        if width != expected:
            where = tap_name(config, modality)
            raise ValueError(
                f"{modality} encoder {info.name_or_path!r} gives width {width} at {where}, but the aligner "
                f"weights expect {modality}_hidden_size={expected}"
            )
    check_pipeline(config, text_model)
    return infos


def tapped_width(config: AlignerConfig, modality: str, info: EncoderInfo) -> int:
    """Width of what the config's tap reads from the encoder `info` describes (layer `"auto"`: the last hidden
    state's, until layer selection)."""
    if getattr(config, f"{modality}_layer") == AUTO:
        return info.hidden_sizes[-1]
    tap = config.tap(modality)
    if tap.source == "hidden_states":
        resolve_layer_index(f"{modality}_layer", tap.layer, info.num_hidden_states)
    elif tap.source not in info.output_sizes:
        raise ValueError(
            f"{modality} encoder {info.name_or_path!r} gives no {tap.source!r} (it gives "
            f"{['hidden_states', *info.output_sizes]}), which this aligner reads ({modality}_source)"
        )
    return tap_width(info, tap)


def tap_name(config: AlignerConfig, modality: str) -> str:
    """What the `modality` aligner reads, for messages: `hidden_states[-1] · cls`, `pooler_output`, ..."""
    if getattr(config, f"{modality}_layer") == AUTO:
        return f"{modality}_layer='auto'"
    return config.tap(modality).describe()


def check_pipeline(config: AlignerConfig, text_model: nn.Module) -> None:
    """A `sentence_embedding` tap needs the text encoder to run the sentence-transformers pipeline it was built on."""
    if config.text_source != "sentence_embedding" or config.text_pipeline is None:
        return
    pipeline = getattr(text_model, "pipeline", None)  # through a LoRA wrapper too
    found = pipeline.describe() if isinstance(pipeline, SentencePipeline) else None
    if found != config.text_pipeline:
        raise ValueError(
            f"the aligner reads the sentence-transformers pipeline {json.dumps(config.text_pipeline, sort_keys=True)} "
            f"of its text encoder, but the text encoder given has "
            f"{json.dumps(found, sort_keys=True) if found is not None else 'none'}; load it with "
            "hf_align.encoders.load_encoder('text', ..., source='sentence_embedding') from the same repo"
        )
