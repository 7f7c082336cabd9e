"""What the aligner reads from a frozen encoder: a `Tap` (layer, source, pooling), and how `auto` picks one.

A tap is small, serialisable and explicit, so the config, the feature cache's fingerprint and the model card can all
record it:

* `source="hidden_states"`: `hidden_states[layer]` of the encoder (0 = embeddings); any layer. Aligners saved before
  taps existed read this, also for the last layer.
* `source="last_hidden_state"`: the encoder's own final output, with the final norm that `hidden_states[-1]` lacks in
  DINOv2, ViT, SigLIP, Swin, ... (for EfficientNet and timm models: after the head convolution, wider than the last
  block). Last layer only.
* `source="pooler_output"`: the encoder's own pooled embedding (CLIP's post-layernorm CLS, SigLIP's attention-pooling
  head, ConvNeXt's pooled norm, EfficientNet's and timm models' global pool, CLIP text's end-of-text token, SigLIP
  text's head). Last layer only, already pooled (`pooling="none"`).
* `source="projected"`: a CLIP / SigLIP dual encoder's `image_embeds` / `text_embeds` (the tower's pooled output
  through the model's projection; SigLIP has none, so it equals `pooler_output`). Needs the full model's repo.
* `source="sentence_embedding"`: a sentence-transformers repo's own pipeline (its `Pooling`, `Dense` layers and
  `Normalize`, see `hf_align.encoders.sentence_pipeline`). Text only.

`pooling` (for the sequence sources): `cls`, `mean`, `max`, `last`, `weightedmean` or `tokens` (the whole sequence,
for token methods); see `hf_align.encoders.poolings`. The pooled sources take `none`.

`resolve_tap` turns `auto` into what each family's authors use (`OWN_POOLER_FAMILIES`, `default_source`,
`default_pooling`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

SOURCES = ("hidden_states", "last_hidden_state", "pooler_output", "projected", "sentence_embedding")
SEQUENCE_SOURCES = ("hidden_states", "last_hidden_state")
POOLED_SOURCES = ("pooler_output", "projected", "sentence_embedding")
VISION_POOLINGS = ("cls", "mean", "max", "tokens")
TEXT_POOLINGS = ("cls", "mean", "max", "last", "weightedmean", "tokens")
NO_POOLING = "none"
AUTO = "auto"
MODALITIES = ("vision", "text")


@dataclass(frozen=True)
class Tap:
    """Where features come from: `source` (at hidden-state index `layer` for `hidden_states`) and its `pooling`.

    Args:
        layer (`int`): hidden-state index, negative from the end. The other sources exist only after the last layer:
            they take `-1`.
        source (`str`): one of `SOURCES`.
        pooling (`str`): one of `VISION_POOLINGS` / `TEXT_POOLINGS` for a sequence source, `"none"` for a pooled one.
    """

    layer: int = -1
    source: str = "hidden_states"
    pooling: str = "mean"

    def to_dict(self) -> dict[str, Any]:
        """`{"layer", "source", "pooling"}`, JSON-serialisable (what a config or a cache fingerprint records)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], modality: str = "vision") -> Tap:
        """The tap a `to_dict` wrote, checked like one given by hand (`check_tap`)."""
        if not isinstance(values, dict) or set(values) != {"layer", "source", "pooling"}:
            raise ValueError(f"a tap is a dict with keys layer, source and pooling; got {values!r}")
        return check_tap(cls(**values), modality)

    @property
    def pooled(self) -> bool:
        """Whether the tap gives one vector per input (as opposed to a token sequence)."""
        return self.pooling != "tokens"

    def describe(self) -> str:
        """Short human-readable form for logs and model cards, e.g. `pooler_output`, `hidden_states[4] · mean`."""
        where = f"hidden_states[{self.layer}]" if self.source == "hidden_states" else self.source
        return where if self.pooling == NO_POOLING else f"{where} · {self.pooling}"


def check_tap(tap: Tap, modality: str) -> Tap:
    """Validate a tap's fields and their combination; returns it unchanged.

    Raises:
        ValueError: naming the field, what is allowed and what was given.
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if not isinstance(tap.layer, int) or isinstance(tap.layer, bool):
        raise ValueError(f"{modality} tap layer must be an int hidden-state index, got {tap.layer!r}")
    if tap.source not in SOURCES:
        raise ValueError(f"{modality} tap source must be one of {SOURCES}, got {tap.source!r}")
    if tap.source == "sentence_embedding" and modality == "vision":
        raise ValueError("source 'sentence_embedding' (a sentence-transformers pipeline) exists for text only")
    poolings = VISION_POOLINGS if modality == "vision" else TEXT_POOLINGS
    if tap.source in POOLED_SOURCES:
        if tap.pooling != NO_POOLING:
            raise ValueError(
                f"{modality} source {tap.source!r} is already one vector per input: its pooling must be "
                f"{NO_POOLING!r}, got {tap.pooling!r} (use source 'last_hidden_state' to pool the final tokens)"
            )
        if tap.layer != -1:
            raise ValueError(
                f"{modality} source {tap.source!r} follows the last layer: layer must be -1, got {tap.layer}"
            )
    else:
        if tap.pooling not in poolings:
            raise ValueError(
                f"{modality} pooling of source {tap.source!r} must be one of {poolings}, got {tap.pooling!r}"
            )
        if tap.source == "last_hidden_state" and tap.layer != -1:
            raise ValueError(
                f"{modality} source 'last_hidden_state' is the encoder's final output: layer must be -1, got "
                f"{tap.layer} (use source 'hidden_states' for another layer)"
            )
    return tap


def legacy_tap(layer: int, pooling: str) -> Tap:
    """The tap an aligner saved before taps existed reads: `hidden_states[layer]` pooled with its resolved pooling
    (`cls` / `mean` / `tokens`), also for the last layer. What a config without the tap fields means."""
    return Tap(layer, "hidden_states", pooling)


# Families whose authors embed with the encoder's own pooled output (`pooler_output`) after the last layer. Every other
# family reads its final tokens (`last_hidden_state`): CLS when the sequence has one (ViT, DINOv2, DeiT, BEiT), else
# their mean; decoder-only text models their last token; other text models the mean (what sentence embedding models
# of those families were trained with), and a sentence-transformers repo its own pipeline.
OWN_POOLER_FAMILIES = frozenset(
    {
        "clip_vision_model",
        "clip_text_model",
        "siglip_vision_model",
        "siglip_text_model",
        "siglip2_vision_model",
        "siglip2_text_model",
        "convnext",
        "convnextv2",
        "swin",
        "swinv2",
        "efficientnet",
        "timm_wrapper",
        "resnet",
        "regnet",
    }
)


def default_pooling(info, modality: str, source: str) -> str:
    """What `auto` pooling means for a sequence `source` of the encoder `info` (an `EncoderInfo`) describes.

    Vision: `cls` when the sequence starts with a CLS token, else `mean`. Text: the sentence-transformers pipeline's
    pooling when it is a single mode, `last` for a decoder-only (causal) model, else `mean`.
    """
    if modality == "vision":
        return "cls" if info.num_prefix_tokens.get(source, 0) > 0 else "mean"
    if info.sentence_pooling is not None:
        return info.sentence_pooling
    return "last" if info.causal else "mean"


def default_source(info, modality: str) -> str:
    """What `auto` reads after the last layer for a pooled method: the sentence-transformers pipeline, the encoder's own
    pooled output for `OWN_POOLER_FAMILIES`, else its final tokens (`last_hidden_state`)."""
    if modality == "text" and "sentence_embedding" in info.output_sizes:
        return "sentence_embedding"
    if info.model_type in OWN_POOLER_FAMILIES and "pooler_output" in info.output_sizes:
        return "pooler_output"
    return "last_hidden_state"


def resolve_tap(
    info, modality: str, layer: int = -1, source: str = AUTO, pooling: str = AUTO, tokens: bool = False
) -> Tap:
    """Turn `auto` source and pooling into the tap the encoder's authors use, and check an explicit choice.

    Args:
        info (`EncoderInfo`): the probed encoder (`hf_align.encoders.probe_vision` / `probe_text`).
        modality (`str`): `"vision"` or `"text"`.
        layer (`int`): hidden-state index, negative from the end; the last one (`-1`) opens the other sources.
        source (`str`): `"auto"` or one of `SOURCES`. `auto`: an earlier layer reads `hidden_states`; the last layer
            reads `default_source` for a pooled method with `auto` pooling, `last_hidden_state` for token methods or
            an explicit sequence pooling, and the encoder's own pooled output for pooling `"none"`.
        pooling (`str`): `"auto"`, `"none"` or one of `VISION_POOLINGS` / `TEXT_POOLINGS` (`default_pooling`).
        tokens (`bool`): the method takes token sequences (pooling must then be `tokens` or `auto`).

    Returns:
        A checked `Tap`; sources other than `hidden_states` get `layer=-1`.

    Raises:
        ValueError: naming the argument, what is allowed and what was given.
    """
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ValueError(f"{modality}_layer must be an int hidden-state index here, got {layer!r}")
    count = info.num_hidden_states
    if not -count <= layer < count:
        raise ValueError(
            f"{modality}_layer={layer} is out of range: the encoder exposes {count} hidden states "
            f"(valid indices {-count}..{count - 1})"
        )
    last = layer % count == count - 1
    if tokens:
        if pooling not in (AUTO, "tokens"):
            raise ValueError(f"a token method needs {modality}_pooling='tokens' (or 'auto'), got {pooling!r}")
        pooling = "tokens"
    elif pooling == "tokens":
        raise ValueError(f"{modality}_pooling='tokens' gives token sequences, which a pooled method cannot take")
    if source == AUTO:
        if not last:
            source = "hidden_states"
        elif pooling == AUTO:
            source = default_source(info, modality)
        elif pooling == NO_POOLING:
            source = "sentence_embedding" if "sentence_embedding" in info.output_sizes else "pooler_output"
        else:
            source = "last_hidden_state"
    if source not in SOURCES:
        raise ValueError(f"{modality}_source must be 'auto' or one of {SOURCES}, got {source!r}")
    if source != "hidden_states":
        if not last:
            raise ValueError(
                f"{modality}_source={source!r} exists only after the last layer, but {modality}_layer={layer} is "
                f"hidden state {layer % count} of {count}; use source 'hidden_states' for an earlier layer"
            )
        available = ["hidden_states", *info.output_sizes]
        if source not in available:
            raise ValueError(
                f"{modality}_source={source!r}: this {info.model_type or modality} encoder gives {available}"
                + (" ('projected' needs a dual encoder's full repo)" if source == "projected" else "")
                + (
                    " ('sentence_embedding' needs a sentence-transformers repo)"
                    if source == "sentence_embedding"
                    else ""
                )
            )
        layer = -1
    if pooling == AUTO:
        pooling = NO_POOLING if source in POOLED_SOURCES else default_pooling(info, modality, source)
    if modality == "vision" and pooling == "cls" and info.num_prefix_tokens.get(source, 0) == 0:
        raise ValueError(f"vision_pooling='cls' but the vision encoder's {source} has no CLS token; use 'mean'")
    return check_tap(Tap(layer, source, pooling), modality)


def tap_width(info, tap: Tap) -> int:
    """Width of the features `tap` reads from the encoder `info` describes."""
    if tap.source == "hidden_states":
        return info.hidden_sizes[tap.layer]
    return info.output_sizes[tap.source]


# What each source after the last layer is, in words (model cards).
SOURCE_MEANINGS = {
    "last_hidden_state": "the encoder's own final output",
    "pooler_output": "the encoder's own pooled embedding",
    "projected": "the dual encoder's projected embedding",
}


def describe_tap_in_words(tap: Tap, num_prefix_tokens: int = 0, pipeline: dict | None = None) -> str:
    """Markdown for what `tap` reads, e.g. `` `pooler_output`: the encoder's own pooled embedding ``.

    Args:
        tap (`Tap`): the tap.
        num_prefix_tokens (`int`): leading CLS / register tokens of its sequence (said when `mean` / `max` leave
            several out).
        pipeline (`dict`, *optional*): for a `sentence_embedding` tap, the pipeline (`SentencePipeline.describe()`).
    """
    text = f"`{tap.describe()}`"
    if tap.source == "sentence_embedding":
        pipeline = pipeline or {}
        steps = [f"{' + '.join(pipeline.get('pooling_modes', []))} pooling"]
        for step in pipeline.get("steps", []):
            if step["type"] == "Dense":
                steps.append(f"Dense {step['in_features']}→{step['out_features']} ({step['activation']})")
            else:
                steps.append(step["type"])
        return f"{text}: the repo's sentence-transformers pipeline ({' → '.join(steps)})"
    if tap.source in SOURCE_MEANINGS:
        text += f": {SOURCE_MEANINGS[tap.source]}"
    if num_prefix_tokens > 1 and tap.pooling in ("mean", "max"):
        text += f", its {num_prefix_tokens} CLS / register tokens left out"
    return text
