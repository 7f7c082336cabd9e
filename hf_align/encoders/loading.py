"""Loading frozen encoders, probing what they output, and reading features from them through taps.

Any vision `AutoModel` (ViT, DINOv2, CLIP/SigLIP towers, ConvNeXt, Swin, EfficientNet, timm models through
`TimmWrapperModel`, ...) and any text model (BERT, RoBERTa, MPNet, XLM-R, T5 encoders, CLIP/SigLIP text towers,
decoder-only models such as Qwen, sentence-transformers repos with their own pipeline) works. One forward pass gives
an `EncoderOutputs` (hidden states, the encoder's own final output, its pooled and projected embeddings); a `Tap`
(`hf_align.encoders.taps`) says which of them the aligner reads and how it is pooled, and several taps read one pass
(running and reading live in `hf_align.encoders.outputs` and are re-exported here).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForTextEncoding, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES, MODEL_MAPPING_NAMES

from ..utils.safe_loading import BUNDLE_SUBFOLDERS, raise_if_pickle_only, weight_shapes
from .outputs import (
    POOLER_IS_PROJECTION,
    PROJECTIONS,
    EncoderOutputs,
    dual_type,
    projection_of,
    read_tap,
    run_text_encoder,
    run_vision_encoder,
    text_fixed_length,
    text_taps,
    vision_taps,
)
from .poolings import as_token_sequence
from .sentence_pipeline import SentenceEncoder, SentencePipeline, SentencePipelineError, read_sentence_pipeline
from .taps import AUTO, POOLED_SOURCES, SOURCES

# Vision towers whose sequence has no CLS token at position 0 (they pool with an attention head instead). Only the
# legacy `has_cls` rule of aligners saved before taps reads this; taps count prefix tokens (`num_prefix_tokens`).
_NO_CLS_MODEL_TYPES = {"siglip_vision_model", "siglip2_vision_model", "siglip", "siglip2"}
_MODALITIES = ("vision", "text")


class EncoderLoadError(OSError):
    """An encoder id or path could not be resolved (offline, typo, missing files) or loaded as asked."""


@dataclass
class EncoderInfo:
    """What the aligner needs to know about a frozen encoder; read off one probe forward pass.

    Args:
        name_or_path: where it came from.
        revision: the revision it came from.
        num_hidden_states (`int`): length of `hidden_states` (embeddings + one per block or stage).
        hidden_sizes (`list[int]`): width of each hidden state (ConvNeXt stages differ).
        has_cls (`bool`): the legacy rule of aligners saved before taps: token 0 of `hidden_states` is a CLS token.
        model_type (`str`): the encoder's `config.model_type` (the tower's, for a dual encoder).
        output_sizes (`dict[str, int]`): width of each other source the encoder gives (`last_hidden_state`,
            `pooler_output`, `projected`, `sentence_embedding`).
        num_prefix_tokens (`dict[str, int]`): leading CLS / register tokens of the `hidden_states` and
            `last_hidden_state` sequences (0 for feature maps).
        causal (`bool`): text: each token sees only the ones before it (decoder-only models).
        sentence_pooling (`str`, *optional*): text: the sentence-transformers pipeline's pooling (in
            `hf_align.encoders.poolings` names) when it is a single mode.
    """

    name_or_path: str
    revision: str | None
    num_hidden_states: int
    hidden_sizes: list[int]
    has_cls: bool
    model_type: str = ""
    output_sizes: dict[str, int] = field(default_factory=dict)
    num_prefix_tokens: dict[str, int] = field(default_factory=dict)
    causal: bool = False
    sentence_pooling: str | None = None


# ---------------------------------------------------------------------------------------------------- loading
def load_encoder(
    modality: str,
    name_or_path: str | nn.Module,
    revision: str | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    source: str | None = None,
    subfolder: str = "",
    use_safetensors: bool | None = None,
) -> nn.Module:
    """Load an encoder with its own weights, frozen and in eval mode.

    A CLIP/SigLIP checkpoint holding both towers yields its `vision_model` / `text_model` part; an encoder-decoder text
    repo (T5, flan-t5, sentence-t5) yields its encoder only (`AutoModelForTextEncoding`).

    Args:
        modality (`str`): `"vision"` or `"text"`.
        name_or_path: Hub id, local folder, or an already loaded model.
        revision: passed to `from_pretrained`.
        dtype: passed to `from_pretrained`.
        source (`str`, *optional*): the tap source the caller will read, which decides what is kept with the tower:
            `"projected"` keeps a CLIP repo's projection (`CLIP*ModelWithProjection`); `"sentence_embedding"` wraps a
            text model in its repo's sentence-transformers pipeline (`SentenceEncoder`; the repo must have one);
            `"auto"` does the latter when the text repo has a pipeline. `None` (what aligners saved before taps
            reload with) and the other sources load the plain model.
        subfolder: passed to `from_pretrained` (an encoder bundled in an aligner's repo).
        use_safetensors: passed to `from_pretrained`.

    Raises:
        EncoderLoadError: the id or path cannot be loaded, or it lacks what `source` needs.
    """
    if modality not in _MODALITIES:
        raise ValueError(f"modality must be one of {_MODALITIES}, got {modality!r}")
    if source is not None and source != AUTO and source not in SOURCES:
        raise ValueError(f"source must be None, 'auto' or one of {SOURCES}, got {source!r}")
    keep_projection = source == "projected"
    wants_pipeline = modality == "text" and source in (AUTO, "sentence_embedding")
    if isinstance(name_or_path, nn.Module):
        model, name = name_or_path, getattr(name_or_path, "name_or_path", "") or ""
        if modality == "text" and isinstance(model, PreTrainedModel) and model.config.is_encoder_decoder:
            model = _encoder_only(model)
        model = _tower(modality, model, keep_projection)
        wrap = wants_pipeline and name and not isinstance(model, SentenceEncoder)
        pipeline = _read_pipeline(name, revision) if wrap else None
    else:
        name = os.fspath(name_or_path)
        pipeline = _read_pipeline(name, revision, subfolder) if wants_pipeline else None
        options = {"revision": revision, "subfolder": subfolder, "dtype": dtype, "use_safetensors": use_safetensors}
        if pipeline is not None:
            options["subfolder"] = pipeline.transformer_path
        model = _from_pretrained(modality, name, keep_projection, **options)
        model = _tower(modality, model, keep_projection)
    if pipeline is not None:
        try:
            model = SentenceEncoder.load(model, pipeline, name, revision)
        except SentencePipelineError as err:
            raise EncoderLoadError(f"text_encoder={name!r}: {err}") from err
    if source == "sentence_embedding" and not isinstance(model, SentenceEncoder):
        raise EncoderLoadError(
            f"text_encoder={name!r} has no sentence-transformers pipeline (no modules.json), so it has no "
            "'sentence_embedding'; use source 'pooler_output' or 'last_hidden_state'"
        )
    if (
        keep_projection
        and projection_of(model, modality) is None
        and model.config.model_type not in POOLER_IS_PROJECTION
    ):
        raise EncoderLoadError(
            f"{modality}_encoder={name!r} ({model.config.model_type}) has no projection: source 'projected' needs "
            f"the full repo of a dual encoder ({', '.join(sorted(PROJECTIONS))} or SigLIP)"
        )
    model.requires_grad_(False)
    model.eval()
    return model


def _from_pretrained(modality: str, name: str, keep_projection: bool, **options) -> PreTrainedModel:
    kwargs = {key: value for key, value in options.items() if value is not None and value != ""}
    revision = options.get("revision")
    try:
        config = AutoConfig.from_pretrained(name, **{k: v for k, v in kwargs.items() if k in ("revision", "subfolder")})
        loader = AutoModel
        encoder_class = MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES.get(config.model_type, "")
        if modality == "text" and (config.is_encoder_decoder or encoder_class.endswith("EncoderModel")):
            # Only the encoder (also of a saved T5EncoderModel, whose config names the T5 family): the decoder would
            # demand decoder inputs at the first forward.
            loader = AutoModelForTextEncoding
        wanted = PROJECTIONS.get(dual_type(config), {}).get(modality, ("",))[0]
        if keep_projection and wanted in (config.architectures or []):  # a tower saved with its projection
            loader = getattr(transformers, wanted)
        elif loader is AutoModel and config.model_type not in MODEL_MAPPING_NAMES:
            # A tower AutoModel has no entry for (a saved SigLIP text tower): the class its config names.
            loader = _named_model_class(config) or AutoModel
        # The weights' headers first: a truncated or damaged file fails naming the file (safetensors' error names none).
        weight_shapes(name, **{k: v for k, v in kwargs.items() if k in ("revision", "subfolder")})
        return loader.from_pretrained(name, config=config, **kwargs)
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "false", "")
        hint = " (HF_HUB_OFFLINE is set: only local paths and already-cached Hub ids resolve)" if offline else ""
        at = f" at {modality}_revision={revision!r}" if revision else ""
        raise EncoderLoadError(
            f"{modality}_encoder={name!r}{at} could not be loaded as a transformers AutoModel{hint}: {err}"
        ) from err


def load_bundled_encoder(
    modality: str, repo: str | os.PathLike, revision: str | None, dtype, source: str | None = None
) -> nn.Module:
    """The encoder saved in the aligner's folder or repo (`<modality>_encoder/`), loaded as `load_encoder` loads it
    for the tap `source` (a sentence-transformers pipeline or a CLIP projection comes back with it)."""
    # Bundled encoders come from the aligner's own repo, so the aligner's rule holds for them: safetensors only.
    subfolder = BUNDLE_SUBFOLDERS[modality]
    try:
        return load_encoder(
            modality, os.fspath(repo), revision, dtype, source=source, subfolder=subfolder, use_safetensors=True
        )
    except OSError as err:
        raise_if_pickle_only(repo, {"subfolder": subfolder, "revision": revision}, err)
        raise


def _named_model_class(config: PretrainedConfig) -> type[PreTrainedModel] | None:
    """The transformers model class a config's `architectures` names, if it is one (never anything imported)."""
    for name in config.architectures or []:
        candidate = getattr(transformers, name, None)
        if isinstance(candidate, type) and issubclass(candidate, PreTrainedModel):
            return candidate
    return None


def _read_pipeline(name: str, revision: str | None, subfolder: str = ""):
    try:
        return read_sentence_pipeline(name, revision, subfolder)
    except SentencePipelineError as err:
        raise EncoderLoadError(f"text_encoder={name!r}: {err}") from err


def _tower(modality: str, model: nn.Module, keep_projection: bool) -> nn.Module:
    """Pick one tower out of a dual encoder (CLIPModel, SiglipModel, ...), with its projection when asked."""
    attr = f"{modality}_model"
    if not (hasattr(model, attr) and hasattr(model, "vision_model") and hasattr(model, "text_model")):
        return model
    if keep_projection and model.config.model_type in PROJECTIONS:
        class_name, projection = PROJECTIONS[model.config.model_type][modality]
        config = copy.deepcopy(getattr(model.config, f"{modality}_config"))
        config.projection_dim = model.config.projection_dim  # sub-configs may keep the default 512
        config._name_or_path = model.config._name_or_path
        with torch.device("meta"):  # both parts are replaced by the loaded ones right away
            tower = getattr(transformers, class_name)(config)
        setattr(tower, attr, getattr(model, attr))
        setattr(tower, projection, getattr(model, projection))
        return tower
    return getattr(model, attr)


def _encoder_only(model: PreTrainedModel) -> PreTrainedModel:
    """The encoder of an already loaded encoder-decoder, as `AutoModelForTextEncoding` builds it, same tensors."""
    encoder = AutoModelForTextEncoding.from_config(model.config)
    result = encoder.load_state_dict(model.state_dict(), strict=False)
    if result.missing_keys:
        raise EncoderLoadError(
            f"cannot take the encoder out of {type(model).__name__}: no weights for {sorted(result.missing_keys)[:5]}"
        )
    encoder.config._name_or_path = model.name_or_path
    return encoder.to(device=model.device, dtype=model.dtype)


def encoder_revision(model: nn.Module) -> str | None:
    """Commit hash the encoder was loaded at, `None` for local folders.

    transformers 4 kept it in `config._commit_hash`; transformers 5 no longer does, so it is read off the Hub cache the
    weights came from (`refs/main` -> `snapshots/<commit>/config.json`).
    """
    commit = getattr(model.config, "_commit_hash", None)
    name = getattr(model, "name_or_path", None) or ""
    if commit or not name or os.path.isdir(name):
        return commit
    from huggingface_hub import try_to_load_from_cache
    from transformers.utils.hub import extract_commit_hash

    cached = try_to_load_from_cache(name, "config.json")
    return extract_commit_hash(cached, None) if isinstance(cached, str) else None


def image_size_of(config: PretrainedConfig) -> int:
    """Input side in pixels: timm's `pretrained_cfg["input_size"]`, else `image_size`, else 224."""
    timm_size = (getattr(config, "pretrained_cfg", None) or {}).get("input_size")
    size = timm_size[-1] if timm_size else getattr(config, "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    return int(size or 224)


def _num_channels(config: PretrainedConfig) -> int:
    timm_size = (getattr(config, "pretrained_cfg", None) or {}).get("input_size")
    return int(timm_size[0]) if timm_size else getattr(config, "num_channels", 3)


# ---------------------------------------------------------------------------------------------------- probing
def blank_pixel_values(model: nn.Module) -> torch.Tensor:
    """One black image (1, C, H, W) at the encoder's input size, on its device and in its dtype."""
    size = image_size_of(model.config)
    param = next(model.parameters())
    return torch.zeros(1, _num_channels(model.config), size, size, dtype=param.dtype, device=param.device)


def probe_vision(model: nn.Module, name_or_path: str) -> EncoderInfo:
    """Run one blank image through the encoder to learn its hidden states, outputs and their widths."""
    with torch.no_grad():
        out = run_vision_encoder(model, blank_pixel_values(model))
    states = out.hidden_states
    has_cls = states[-1].dim() == 3 and model.config.model_type not in _NO_CLS_MODEL_TYPES
    prefix = {
        "hidden_states": _prefix_tokens(model, states[-1], final=False),
        "last_hidden_state": _prefix_tokens(model, out.last_hidden_state, final=True),
    }
    return EncoderInfo(
        name_or_path,
        encoder_revision(model),
        len(states),
        [_width(s) for s in states],
        has_cls,
        model.config.model_type,
        _output_sizes(out),
        prefix,
    )


def probe_text(model: nn.Module, name_or_path: str) -> EncoderInfo:
    """Run two 4-token texts differing in their last token through the encoder: widths, outputs, and whether it is
    causal (the first three tokens' outputs do not change)."""
    vocab = getattr(model.config, "vocab_size", None) or 6
    input_ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5]]).clamp(max=vocab - 1)
    with torch.no_grad():
        out = run_text_encoder(model, input_ids)
    states, last = out.hidden_states, as_token_sequence(out.last_hidden_state).float()
    scale = last.abs().amax().clamp(min=1e-6)
    causal = bool((last[0, :3] - last[1, :3]).abs().amax() <= 1e-5 * scale) and not torch.equal(last[0, 3], last[1, 3])
    pipeline = getattr(model, "pipeline", None)  # through a LoRA wrapper too
    pipeline = pipeline if isinstance(pipeline, SentencePipeline) else None
    single = pipeline.poolings[0] if pipeline is not None and len(pipeline.poolings) == 1 else None
    return EncoderInfo(
        name_or_path,
        encoder_revision(model),
        len(states),
        [s.shape[-1] for s in states],
        True,
        model.config.model_type,
        _output_sizes(out),
        {"hidden_states": 0, "last_hidden_state": 0},
        causal,
        single if single in ("cls", "mean", "max", "last", "weightedmean") else None,
    )


def _output_sizes(out: EncoderOutputs) -> dict[str, int]:
    sizes = {"last_hidden_state": _width(out.last_hidden_state)}
    for source in POOLED_SOURCES:
        value = getattr(out, source)
        if value is not None:
            sizes[source] = value.shape[-1]
    return sizes


def _prefix_tokens(model: nn.Module, state: torch.Tensor, final: bool) -> int:
    """Leading CLS / register tokens of a (B, T, C) sequence: timm says; for patch models, tokens beyond the grid."""
    if state.dim() != 3:
        return 0
    timm_model = getattr(model, "timm_model", None)
    if timm_model is not None:
        # timm's intermediate states come without prefix tokens; its final features keep them.
        return int(getattr(timm_model, "num_prefix_tokens", 0)) if final else 0
    patch = getattr(model.config, "patch_size", None)
    if isinstance(patch, (list, tuple)):
        patch = patch[0]
    if not patch:
        return 0
    extra = state.shape[1] - (image_size_of(model.config) // patch) ** 2
    return extra if extra > 0 else 0


def _width(state: torch.Tensor) -> int:
    # Convolutional stages are (B, C, H, W); transformer blocks are (B, T, C).
    return state.shape[1] if state.dim() == 4 else state.shape[-1]


def non_finite_rows(values: torch.Tensor) -> list[int]:
    """Indices of the rows (dim 0) of `values` (B, ...) holding a NaN or an Inf; empty when all are finite."""
    finite = torch.isfinite(values)
    if bool(finite.all()):  # one reduction (and one device sync) in the common, healthy case
        return []
    return torch.nonzero(~finite.reshape(len(values), -1).all(1)).flatten().tolist()


__all__ = [
    "EncoderInfo",
    "EncoderLoadError",
    "EncoderOutputs",
    "as_token_sequence",
    "blank_pixel_values",
    "encoder_revision",
    "image_size_of",
    "load_bundled_encoder",
    "load_encoder",
    "non_finite_rows",
    "probe_text",
    "probe_vision",
    "read_tap",
    "run_text_encoder",
    "run_vision_encoder",
    "text_fixed_length",
    "text_taps",
    "vision_taps",
]
