"""Optional LoRA adapters (PEFT) on the last blocks of the frozen encoders, trained end to end with the aligner.

```python
from peft import LoraConfig

# one config for both encoders: the suffixes name the attention projections of ViT ("q_proj") and BERT ("query")
lora = LoraConfig(r=8, target_modules=["q_proj", "v_proj", "query", "value"], layers_to_transform=[-2, -1])
model = AlignerModel.from_encoders(vision_id, text_id, method="linear", encoder_lora=lora)
# or one encoder, on a model you already have:
model.add_encoder_lora(vision=LoraConfig(r=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[-1]))
```

How hf_align reads a `LoraConfig` (everything else is PEFT's usual meaning):

* `layers_to_transform` counts the encoder's blocks, and negative values count back from the *tapped* layer: `-1` is
  the block whose output the aligner reads (the encoder's last block with the default `vision_layer=-1`). A block
  after the tapped layer can never change the features, so asking for one is an error. `None` = every block up to the
  tap. The blocks are found as the encoder's list of `num_hidden_states - 1` modules, so this works whatever the
  architecture calls them (`layers`, `encoder.layer`, `encoder.stages`, ...).
* `target_modules` is matched inside those blocks only, by PEFT's rules: module-name suffixes, or (PEFT allows them
  only without `layers_to_transform`) a regex string or `"all-linear"`; `None` = PEFT's default for the model type.
  The adapter is created with the resolved full module names, so its `adapter_config.json` loads with plain PEFT too:
  `PeftModel.from_pretrained(AutoModel.from_pretrained(encoder_id), "<aligner>", subfolder="vision_encoder_lora")`.

The encoder becomes a `peft.PeftModel`: base weights stay frozen, the LoRA weights train with the aligner (their
dropout follows `model.train()` while the encoders themselves stay in eval mode). Training must run on raw inputs
(`pixel_values`, `input_ids`, ...), not on a feature cache, since the features now change as the adapter trains;
`ImageTextCollator` makes such batches from image–caption rows for `transformers.Trainer`:

```python
trainer = Trainer(model=model, args=TrainingArguments(..., remove_unused_columns=False), train_dataset=pairs,
                  data_collator=ImageTextCollator(model.processor, image_column="image", text_column="caption"))
```

Saving (`AlignerModel.save_pretrained`) writes each adapter beside the aligner weights as `vision_encoder_lora/` /
`text_encoder_lora/` (`adapter_model.safetensors` + `adapter_config.json`); `config.encoder_lora` lists them and
`AlignerModel.from_pretrained` re-applies them (frozen, as PEFT loads adapters; `encoder_lora_parameters(model)`
gives the tensors to unfreeze for further training). The aligner's own `model.safetensors` never holds an encoder
tensor, adapter included.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from ..utils.safe_loading import ArtefactError, require_safetensors
from .sentence_pipeline import SentenceEncoder

MODALITIES = ("vision", "text")
LORA_SUBFOLDERS = {"vision": "vision_encoder_lora", "text": "text_encoder_lora"}
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_ADAPTER_WEIGHTS = "adapter_model.bin"


class ImageTextCollator:
    """Batches raw image–caption rows (one caption per image, pair i matching pair i) for end-to-end training.

    Returns the processor's `pixel_values` (B, C, H, W), `input_ids` / `attention_mask` (B, T) (+ `token_type_ids`)
    and `return_loss=True`, so `AlignerModel.forward` runs both encoders and returns the InfoNCE loss.
    """

    def __init__(self, processor, image_column: str = "image", text_column: str = "caption"):
        self.processor = processor
        self.image_column = image_column
        self.text_column = text_column

    def __call__(self, rows: list[dict]) -> dict:
        for argument, column in (("image_column", self.image_column), ("text_column", self.text_column)):
            if column not in rows[0]:
                raise ValueError(f"{argument}={column!r} is not in the batch rows, which have {sorted(rows[0])}")
        texts = [row[self.text_column] for row in rows]
        not_text = sorted({type(t).__name__ for t in texts if not isinstance(t, str)})
        if not_text:
            raise ValueError(f"{self.text_column!r} must hold one caption string per image, got {not_text}")
        batch = dict(self.processor(images=[row[self.image_column] for row in rows], text=texts))
        batch["return_loss"] = True
        return batch


def split_encoder_lora(encoder_lora) -> dict[str, LoraConfig]:
    """`from_encoders(encoder_lora=...)`: one `LoraConfig` for both encoders, or `{"vision": ..., "text": ...}`."""
    if isinstance(encoder_lora, LoraConfig):
        return {modality: encoder_lora for modality in MODALITIES}
    if isinstance(encoder_lora, dict):
        unknown = sorted(set(encoder_lora) - set(MODALITIES))
        if unknown:
            raise ValueError(f"encoder_lora keys must be 'vision' and/or 'text', got {unknown}")
        for modality, config in encoder_lora.items():
            _check_lora_config(f"encoder_lora[{modality!r}]", config)
        return dict(encoder_lora)
    raise TypeError(
        f"encoder_lora must be a peft.LoraConfig or a dict {{'vision': LoraConfig, 'text': LoraConfig}}, "
        f"got {type(encoder_lora).__name__}"
    )


def _check_lora_config(name: str, config) -> None:
    if not isinstance(config, LoraConfig):
        raise TypeError(f"{name} must be a peft.LoraConfig, got {type(config).__name__}")


def add_encoder_lora(model, vision: LoraConfig | None = None, text: LoraConfig | None = None) -> None:
    """Wrap the vision and/or text encoder of `model` in a trainable LoRA adapter (see the module docstring).

    Every config is resolved against its encoder before any encoder is touched, so an error leaves `model` unchanged.
    """
    if not model.has_encoders:
        raise ValueError(
            "add_encoder_lora needs the encoders attached (this model was loaded with load_encoders=False?)"
        )
    requested = {modality: config for modality, config in (("vision", vision), ("text", text)) if config is not None}
    if not requested:
        raise ValueError("add_encoder_lora needs a LoraConfig for `vision`, `text` or both; got neither")
    resolved = {}
    for modality, config in requested.items():
        _check_lora_config(modality, config)
        encoder = getattr(model, f"{modality}_model")
        if isinstance(encoder, PeftModel):
            raise ValueError(f"the {modality} encoder already has a LoRA adapter")
        resolved[modality] = resolve_lora_config(
            config,
            encoder,
            modality,
            model.config.absolute_layer(modality),
            getattr(model.config, f"{modality}_num_layers"),
        )
    for modality, config in resolved.items():
        setattr(model, f"{modality}_model", get_peft_model(getattr(model, f"{modality}_model"), config))
    model.config.encoder_lora = sorted(set(model.config.encoder_lora or []) | set(resolved))
    model.train(model.training)  # new LoRA modules start in train mode; put every mode back in line with the model's


def resolve_lora_config(
    config: LoraConfig, encoder: nn.Module, modality: str, tapped_layer: int, num_hidden_states: int
) -> LoraConfig:
    """A copy of `config` whose `target_modules` are the full names of the matched modules in the chosen blocks.

    Args:
        tapped_layer: absolute index of the hidden state the aligner reads; block `b` produces hidden state `b + 1`, so
            blocks `0 .. tapped_layer - 1` reach it.
        num_hidden_states: how many hidden states the encoder returns (embeddings + one per block).
    """
    prefix, blocks = _block_list(encoder, modality, num_hidden_states - 1)
    chosen = _chosen_blocks(config.layers_to_transform, modality, tapped_layer)
    target_modules = config.target_modules
    if target_modules is None:
        model_type = encoder.config.model_type
        target_modules = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        if target_modules is None:
            raise ValueError(
                f"{modality} LoraConfig has target_modules=None and PEFT has no default for model_type {model_type!r}; "
                f"give target_modules, e.g. names of the linear layers of one block: {_linear_names(blocks[0])}"
            )
    matcher = dataclasses.replace(config, target_modules=target_modules, layers_to_transform=None, layers_pattern=None)
    names = []
    for block in chosen:
        for name, module in blocks[block].named_modules():
            full = f"{prefix}.{block}.{name}"
            if not name or isinstance(module, LoraLayer):
                continue
            if target_modules == "all-linear":
                hit = isinstance(module, nn.Linear)
            else:
                hit = bool(check_target_module_exists(matcher, full))
            if hit:
                names.append(full)
    if not names:
        raise ValueError(
            f"{modality} LoraConfig target_modules={_as_listed(config.target_modules)!r} matches nothing in blocks "
            f"{chosen} of the {modality} encoder; the linear layers of one block are {_linear_names(blocks[0])}"
        )
    return dataclasses.replace(config, target_modules=names, layers_to_transform=None, layers_pattern=None)


def _block_list(encoder: nn.Module, modality: str, count: int) -> tuple[str, nn.ModuleList]:
    """The encoder's outermost `nn.ModuleList` of `count` blocks (one per hidden state after the embeddings)."""
    for name, module in encoder.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return name, module
    raise ValueError(
        f"cannot find the {modality} encoder's list of {count} blocks (one per hidden state after the embeddings), "
        "so its blocks cannot be chosen for LoRA"
    )


def _chosen_blocks(layers_to_transform, modality: str, tapped_layer: int) -> list[int]:
    if layers_to_transform is None:
        return list(range(tapped_layer))
    requested = [layers_to_transform] if isinstance(layers_to_transform, int) else list(layers_to_transform)
    chosen = []
    for index in requested:
        block = tapped_layer + index if index < 0 else index
        if not 0 <= block < tapped_layer:
            raise ValueError(
                f"{modality} LoraConfig layers_to_transform has {index}, but only blocks 0..{tapped_layer - 1} "
                f"(or -{tapped_layer}..-1, counted back from the tapped layer) reach the hidden state the aligner "
                f"reads ({modality}_layer -> hidden state {tapped_layer})"
            )
        chosen.append(block)
    return sorted(set(chosen))


def _as_listed(target_modules):
    # LoraConfig turns a list into a set; show it sorted, as the user would have written it.
    return sorted(target_modules) if isinstance(target_modules, (set, list, tuple)) else target_modules


def _linear_names(block: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, module in block.named_modules() if isinstance(module, nn.Linear)})


def lora_encoders(model) -> dict[str, PeftModel]:
    """The model's encoders that carry a LoRA adapter, by modality."""
    return {m: e for m in MODALITIES if isinstance(e := getattr(model, f"{m}_model", None), PeftModel)}


def encoder_lora_parameters(model) -> list[nn.Parameter]:
    """Every LoRA tensor of the encoders (frozen after `from_pretrained`; set `requires_grad` to train further)."""
    return [
        p for encoder in lora_encoders(model).values() for name, p in encoder.named_parameters() if ".lora_" in name
    ]


def set_lora_train_mode(model, mode: bool) -> None:
    """LoRA dropout follows the model's train/eval mode while the encoders around it stay in eval mode."""
    for encoder in lora_encoders(model).values():
        for module in encoder.modules():
            if isinstance(module, LoraLayer):
                module.lora_dropout.train(mode)


def save_encoder_lora(model, save_directory: str | os.PathLike) -> None:
    """Write each adapter in PEFT's format to `<save_directory>/<modality>_encoder_lora/`."""
    adapters = lora_encoders(model)
    missing = sorted(set(model.config.encoder_lora or []) - set(adapters))
    if missing:
        raise ValueError(
            f"config.encoder_lora lists {missing} but no LoRA adapter is loaded on those encoders (loaded with "
            "load_encoders=False?); saving now would lose the adapter weights"
        )
    for modality, encoder in adapters.items():
        path = os.path.join(save_directory, LORA_SUBFOLDERS[modality])
        os.makedirs(path, exist_ok=True)
        # PEFT's own file layout, without the template README that PeftModel.save_pretrained adds.
        save_file(get_peft_model_state_dict(encoder), os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config = copy.deepcopy(encoder.peft_config["default"])
        config.inference_mode = True
        config.base_model_name_or_path = getattr(model.config, f"{modality}_encoder")
        config.revision = getattr(model.config, f"{modality}_revision")
        config.save_pretrained(path)


def load_encoder_lora(model, pretrained_model_name_or_path: str | os.PathLike, revision: str | None = None) -> None:
    """Re-apply the adapters `config.encoder_lora` lists, from the aligner's folder or Hub repo (frozen).

    Like the aligner's own weights, adapters load from safetensors only: PEFT would fall back to unpickling an
    `adapter_model.bin`, which is refused here (never opened), as is a damaged `adapter_model.safetensors` (named).
    """
    for modality in model.config.encoder_lora or []:
        encoder = getattr(model, f"{modality}_model")
        subfolder = LORA_SUBFOLDERS[modality]
        location = {"subfolder": subfolder, "revision": revision}
        what = f"the {modality} encoder's LoRA adapter"
        shapes = require_safetensors(
            pretrained_model_name_or_path, ADAPTER_WEIGHTS, PICKLE_ADAPTER_WEIGHTS, what, **location
        )
        try:
            config = LoraConfig.from_pretrained(str(pretrained_model_name_or_path), **location)
            _check_ranks(config, shapes, f"{os.fspath(pretrained_model_name_or_path)!r}: {what} in {subfolder}/")
            wrapped = PeftModel.from_pretrained(encoder, str(pretrained_model_name_or_path), config=config, **location)
        except ArtefactError:
            raise
        except (OSError, ValueError, TypeError, RuntimeError) as err:
            raise ArtefactError(
                f"{os.fspath(pretrained_model_name_or_path)!r}: {what} in {subfolder}/ could not be loaded: {err}"
            ) from err
        setattr(model, f"{modality}_model", wrapped)
    if model.config.encoder_lora:
        model.train(model.training)


def _check_ranks(config: LoraConfig, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """PEFT builds every LoRA matrix at the rank its config names before it loads the weights: a rank no saved
    `lora_A` matrix has would be allocated for nothing (and then fail to load), so it is refused first."""
    saved = max((shape[0] for name, shape in shapes.items() if ".lora_A." in name and shape), default=0)
    ranks = {"r": config.r, **{f"rank_pattern[{k!r}]": v for k, v in (config.rank_pattern or {}).items()}}
    too_big = {name: rank for name, rank in ranks.items() if not isinstance(rank, int) or rank > saved}
    if too_big:
        raise ArtefactError(
            f"{where}: adapter_config.json asks for LoRA rank(s) {too_big}, but the largest rank in "
            f"{ADAPTER_WEIGHTS} is {saved}; the config does not describe its weights"
        )


def base_encoder_state_dict(encoder: PeftModel) -> dict[str, torch.Tensor]:
    """The wrapped encoder's own weights under their original names (as `AutoModel.from_pretrained` gives them)."""
    state_dict = {}
    for name, tensor in encoder.get_base_model().state_dict().items():
        if ".lora_" in name:
            continue
        # PEFT keeps the wrapped layer's weights under `<layer>.base_layer.<param>`.
        state_dict[name.replace(".base_layer.", ".")] = tensor
    return state_dict


def save_base_encoder(encoder: nn.Module, directory: str | os.PathLike) -> None:
    """Save an encoder's own (base) weights as a plain transformers folder (a sentence-transformers folder for a
    `SentenceEncoder`), leaving any LoRA adapter out."""
    if not isinstance(encoder, PeftModel):
        encoder.save_pretrained(directory)
        return
    base, state_dict = encoder.get_base_model(), base_encoder_state_dict(encoder)
    if isinstance(base, SentenceEncoder):
        # The wrapper saves its pipeline's own modules; the transformers model under it takes its own names.
        state_dict = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
    base.save_pretrained(directory, state_dict=state_dict)


__all__ = [
    "LORA_SUBFOLDERS",
    "ImageTextCollator",
    "add_encoder_lora",
    "base_encoder_state_dict",
    "encoder_lora_parameters",
    "load_encoder_lora",
    "lora_encoders",
    "resolve_lora_config",
    "save_base_encoder",
    "save_encoder_lora",
    "set_lora_train_mode",
    "split_encoder_lora",
]
