"""A sentence-transformers repo's own embedding pipeline, run without sentence-transformers, frozen.

A sentence-transformers repo lists its modules in `modules.json`: a `Transformer` (the transformers model, at the repo
root or in a subfolder), a `Pooling` (`1_Pooling/config.json`: cls / mean / max / mean_sqrt_len_tokens /
weightedmean / lasttoken, several modes concatenated), then any `Dense` layers (`config.json` + weights) and a
`Normalize`. `SentenceEncoder` holds the transformers model and those modules as one frozen `nn.Module` that answers
the same forward call as the model itself (`input_ids`, `attention_mask`, `output_hidden_states=True`), with the
pipeline's output added as `sentence_embedding`. Hidden states are the model's own, so every other tap reads the same
values with or without the pipeline.

Safety: every path `modules.json` names (and every file read there) must resolve, symlinks followed, inside the
sentence-transformers folder (`hf_align.utils.safe_loading.resolve_inside`); `Dense` weights load from
`model.safetensors` only (a pickle-only `pytorch_model.bin` is refused: unpickling can run code), after their header was
checked against
the Dense config (nothing is allocated for a config wider than its weights); and the activation must be one of the
plain `torch.nn` activations in `ACTIVATIONS` (a config naming any other class is refused rather than imported).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import ModelOutput

from ..utils.checks import MAX_WIDTH
from ..utils.safe_loading import ArtefactError, repo_file, resolve_inside, safetensors_shapes, shape_mismatches
from .poolings import pool_tokens

MODULES_FILE = "modules.json"
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# sentence-transformers' pooling mode -> `hf_align.encoders.poolings` name
_POOLING_NAMES = {
    "cls": "cls",
    "max": "max",
    "mean": "mean",
    "mean_sqrt_len_tokens": "mean_sqrt_len",
    "weightedmean": "weightedmean",
    "lasttoken": "last",
}
# Boolean keys of configs written by sentence-transformers < 5, in the order it concatenates the modes.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
ACTIVATIONS = ("Identity", "Tanh", "ReLU", "ReLU6", "GELU", "Sigmoid", "SiLU", "LeakyReLU", "ELU", "Softplus", "Mish")
_SUPPORTED_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")


class SentencePipelineError(ArtefactError):
    """A sentence-transformers repo whose pipeline cannot be run as configured (unknown module, pickle weights, a
    path outside its folder, weights that do not fit their config, ...)."""


@dataclass(frozen=True)
class SentencePipeline:
    """A sentence-transformers repo's pipeline as its files describe it (no weights).

    Args:
        transformer_path (`str`): subfolder holding the transformers model and tokenizer (`""` = the repo root).
        pooling_modes (`tuple[str, ...]`): sentence-transformers pooling modes, concatenated in this order.
        include_prompt (`bool`): whether prompt tokens are pooled; hf_align never prepends a prompt, so it has no
            effect here and is recorded for completeness.
        steps (`tuple[dict, ...]`): the modules after pooling, in order: `{"type": "Dense", "path": ..., "config":
            {...}}` or `{"type": "Normalize"}`.
        max_seq_length (`int`, *optional*): truncation length the repo was trained with (`sentence_bert_config.json`).
    """

    transformer_path: str = ""
    pooling_modes: tuple[str, ...] = ("mean",)
    include_prompt: bool = True
    steps: tuple[dict, ...] = field(default_factory=tuple)
    max_seq_length: int | None = None

    @property
    def poolings(self) -> tuple[str, ...]:
        """The pooling modes under their `hf_align.encoders.poolings` names (`lasttoken` -> `last`, ...)."""
        return tuple(_POOLING_NAMES[mode] for mode in self.pooling_modes)

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable summary for model cards and cache fingerprints."""
        steps = []
        for step in self.steps:
            if step["type"] == "Dense":
                config = step["config"]
                steps.append(
                    {
                        "type": "Dense",
                        "in_features": config["in_features"],
                        "out_features": config["out_features"],
                        "bias": config.get("bias", True),
                        "activation": _activation_name(config),
                        "use_residual": config.get("use_residual", False),
                    }
                )
            else:
                steps.append({"type": step["type"]})
        return {
            "pooling_modes": list(self.pooling_modes),
            "include_prompt": self.include_prompt,
            "steps": steps,
            "max_seq_length": self.max_seq_length,
        }


def read_sentence_pipeline(
    name_or_path: str, revision: str | None = None, subfolder: str = ""
) -> SentencePipeline | None:
    """The pipeline a sentence-transformers repo declares in `modules.json`, or `None` for a plain transformers repo.

    `subfolder`: where in the repo the sentence-transformers folder is (a bundled encoder); the paths of the result
    are relative to the repo root.

    Raises:
        SentencePipelineError: for a module hf_align cannot run (anything but Transformer, Pooling, Dense,
            Normalize), a module order other than Transformer -> Pooling -> Dense / Normalize, or an unreadable config.
    """
    modules_path = repo_file(name_or_path, _join(subfolder, MODULES_FILE), revision=revision)
    if modules_path is None:
        return None
    # Every path modules.json names must stay inside the sentence-transformers folder (after symlinks), whether the
    # folder is local, a Hub download or bundled in an aligner (then `text_encoder/`, not the aligner around it).
    folder = os.path.dirname(modules_path)
    _inside(name_or_path, folder, MODULES_FILE, MODULES_FILE)
    modules = _read_modules(name_or_path, modules_path)
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    unknown = sorted({kind for kind in kinds if kind not in _SUPPORTED_MODULES})
    if unknown:
        raise SentencePipelineError(
            f"{name_or_path!r}: modules.json lists sentence-transformers modules {unknown} that hf_align cannot run "
            f"(it runs {', '.join(_SUPPORTED_MODULES)}); choose another text tap source than 'sentence_embedding'"
        )
    if kinds[:2] != ["Transformer", "Pooling"]:
        raise SentencePipelineError(
            f"{name_or_path!r}: hf_align runs a modules.json that starts with Transformer then Pooling, got {kinds}"
        )
    paths = [
        _inside(name_or_path, folder, module.get("path", "") or "", f"modules.json module {module.get('idx')} ({kind})")
        for module, kind in zip(modules, kinds)
    ]

    def read(path: str, filename: str, required: bool = True):
        """`filename` of the module at `path` (in the folder), as JSON; `None` when absent and not `required`."""
        relative = _inside(name_or_path, folder, _join(path, filename), f"{filename} of module {path or '.'!r}")
        local = repo_file(name_or_path, _join(subfolder, relative), revision=revision)
        if local is None and required:
            raise SentencePipelineError(
                f"{name_or_path!r}: modules.json needs {_join(subfolder, relative)!r}, which the repo does not have"
            )
        return None if local is None else _read_json(local, dict)

    transformer_path = _join(subfolder, paths[0])
    modes, include_prompt = _pooling_modes(name_or_path, read(paths[1], "config.json"))
    steps = []
    for path, kind in zip(paths[2:], kinds[2:]):
        if kind == "Pooling" or kind == "Transformer":
            raise SentencePipelineError(f"{name_or_path!r}: modules.json has a second {kind} module: {kinds}")
        if kind == "Dense":
            config = read(path, "config.json")
            _check_dense_config(name_or_path, _join(subfolder, path), config)
            steps.append({"type": "Dense", "path": _join(subfolder, path), "config": config})
        else:
            steps.append({"type": "Normalize"})
    st_config = read(paths[0], "sentence_bert_config.json", required=False) or {}
    max_seq_length = st_config.get("max_seq_length")
    if max_seq_length is not None and not (isinstance(max_seq_length, int) and not isinstance(max_seq_length, bool)):
        raise SentencePipelineError(
            f"{name_or_path!r}: sentence_bert_config.json has max_seq_length={max_seq_length!r}; expected an int"
        )
    return SentencePipeline(transformer_path, modes, include_prompt, tuple(steps), max_seq_length)


class DenseStep(nn.Module):
    """sentence-transformers' `Dense`: `activation(linear(x))`, plus `x` (or a linear map of it) when residual."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        self.linear = nn.Linear(config["in_features"], config["out_features"], bias=config.get("bias", True))
        self.activation = getattr(nn, _activation_name(config))()
        self.use_residual = bool(config.get("use_residual", False))
        if self.use_residual and config["in_features"] != config["out_features"]:
            self.residual = nn.Linear(config["in_features"], config["out_features"], bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.activation(self.linear(features))
        if self.use_residual:
            out = out + (self.residual(features) if hasattr(self, "residual") else features)
        return out


class NormalizeStep(nn.Module):
    """sentence-transformers' `Normalize`: L2 normalisation of the embedding."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features, p=2, dim=-1)


@dataclass
class SentenceEncoderOutput(ModelOutput):
    """The wrapped model's outputs plus the pipeline's embedding.

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(B, T, C)`): the model's final output (the tokens the
            pipeline pools).
        pooler_output (`torch.FloatTensor` of shape `(B, C)`, *optional*): the model's own pooler, when it has one.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): the model's hidden states.
        sentence_embedding (`torch.FloatTensor` of shape `(B, D)`): pooling, Dense layers and Normalize applied.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    sentence_embedding: torch.FloatTensor | None = None


class SentenceEncoder(nn.Module):
    """A transformers text model with its sentence-transformers pipeline (pooling, Dense, Normalize), frozen.

    Args:
        model (`PreTrainedModel`): the text model (`AutoModel`, or the encoder of an encoder-decoder).
        pipeline (`SentencePipeline`): what `read_sentence_pipeline` found.
        steps (`list[nn.Module]`): the loaded post-pooling modules (`DenseStep` / `NormalizeStep`), in order.
        name_or_path (`str`): the repo id or folder, reported as the encoder's `name_or_path`.
    """

    main_input_name = "input_ids"

    def __init__(self, model: nn.Module, pipeline: SentencePipeline, steps: list[nn.Module], name_or_path: str = ""):
        super().__init__()
        self.model = model
        self.pipeline = pipeline
        # nn.Sequential, not a ModuleList: code that looks for the encoder's list of blocks must not find these.
        self.steps = nn.Sequential(*steps)
        self.name_or_path = name_or_path

    @classmethod
    def load(
        cls, model: nn.Module, pipeline: SentencePipeline, name_or_path: str, revision: str | None = None
    ) -> SentenceEncoder:
        """Load the pipeline's Dense weights (safetensors only) around an already loaded `model`.

        Each Dense layer is built on the meta device and compared with its weights' header first, so a config asking
        for more than its weights hold is refused before anything is allocated.
        """
        steps: list[nn.Module] = []
        for step in pipeline.steps:
            if step["type"] == "Normalize":
                steps.append(NormalizeStep())
                continue
            weights = repo_file(name_or_path, _join(step["path"], "model.safetensors"), revision=revision)
            if weights is None:
                pickle = repo_file(name_or_path, _join(step["path"], "pytorch_model.bin"), revision=revision)
                found = f"only a pickle checkpoint ({_join(step['path'], 'pytorch_model.bin')})" if pickle else "none"
                raise SentencePipelineError(
                    f"{name_or_path!r}: the Dense module in {step['path']!r} has no model.safetensors weights "
                    f"(found {found}); hf_align loads safetensors only, since unpickling can run arbitrary code. If "
                    "you trust the repo, convert it: safetensors.torch.save_file(torch.load(path, weights_only=True), "
                    "'model.safetensors')"
                )
            # The folder was checked when the pipeline was read; the file itself may be a symlink out of it.
            _inside(name_or_path, os.path.dirname(weights), os.path.basename(weights), f"Dense {step['path']!r}")
            try:
                found_shapes = safetensors_shapes(weights)
            except ArtefactError as err:
                raise SentencePipelineError(f"{name_or_path!r}: Dense weights: {err}") from err
            with torch.device("meta"):
                dense = DenseStep(step["config"])
            expected = {name: tuple(tensor.shape) for name, tensor in dense.state_dict().items()}
            mismatch = {what: keys for what, keys in shape_mismatches(expected, found_shapes).items() if keys}
            if mismatch:
                raise SentencePipelineError(
                    f"{name_or_path!r}: Dense weights {weights!r} do not match {_join(step['path'], 'config.json')} "
                    f"(in_features, out_features, bias, use_residual): {mismatch}"
                )
            try:
                dense.load_state_dict(load_file(weights), assign=True)  # the meta tensors become the loaded ones
            except (RuntimeError, ValueError) as err:  # shapes fit, but e.g. integer weights cannot be parameters
                message = f"{name_or_path!r}: Dense weights {weights!r} cannot be loaded: {err}"
                raise SentencePipelineError(message) from err
            steps.append(dense)
        encoder = cls(model, pipeline, steps, name_or_path)
        param = next(model.parameters())
        encoder.steps.to(device=param.device, dtype=param.dtype)  # only the steps: the model keeps its own dtypes
        return encoder

    @property
    def config(self):
        """The wrapped model's config (model type, sizes, token ids)."""
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> SentenceEncoderOutput:
        """Run the model, then the pipeline on its `last_hidden_state` (what sentence-transformers pools).

        Shapes: `input_ids` / `attention_mask` / `token_type_ids` (B, T) -> `sentence_embedding` (B, D).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        out = self.model(**inputs, output_hidden_states=output_hidden_states, return_dict=True, **kwargs)
        tokens = out.last_hidden_state
        pooled = [pool_tokens(tokens, mode, attention_mask)[0] for mode in self.pipeline.poolings]
        embedding = self.steps(torch.cat(pooled, dim=-1))
        return SentenceEncoderOutput(
            last_hidden_state=tokens,
            pooler_output=getattr(out, "pooler_output", None),
            hidden_states=out.hidden_states,
            sentence_embedding=embedding,
        )

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write a sentence-transformers folder that `load_encoder` (and sentence-transformers) load back.

        The model goes to the folder root (its `save_pretrained`, with `**kwargs`), the pooling config to
        `1_Pooling/`, Dense layers to `2_Dense/`, ... (safetensors), and the module list to `modules.json`.
        """
        save_directory = os.fspath(save_directory)
        self.model.save_pretrained(save_directory, **kwargs)
        modules = [_module_entry(0, "", "Transformer"), _module_entry(1, "1_Pooling", "Pooling")]
        os.makedirs(os.path.join(save_directory, "1_Pooling"), exist_ok=True)
        width = self.model.config.hidden_size
        pooling = {"word_embedding_dimension": width, "include_prompt": self.pipeline.include_prompt}
        pooling.update({key: mode in self.pipeline.pooling_modes for key, mode in _LEGACY_POOLING_KEYS.items()})
        if len(self.pipeline.pooling_modes) > 1:
            # Boolean keys fix sentence-transformers' own order; an explicit list keeps the order this pipeline uses.
            pooling["pooling_mode"] = list(self.pipeline.pooling_modes)
        _write_json(os.path.join(save_directory, "1_Pooling", "config.json"), pooling)
        for index, step in enumerate(self.steps, start=2):
            kind = "Dense" if isinstance(step, DenseStep) else "Normalize"
            path = f"{index}_{kind}"
            modules.append(_module_entry(index, path, kind))
            if isinstance(step, DenseStep):
                os.makedirs(os.path.join(save_directory, path), exist_ok=True)
                _write_json(os.path.join(save_directory, path, "config.json"), step.config)
                state = {k: v.detach().contiguous().cpu() for k, v in step.state_dict().items()}
                save_file(state, os.path.join(save_directory, path, "model.safetensors"), metadata={"format": "pt"})
        _write_json(os.path.join(save_directory, MODULES_FILE), modules)
        _write_json(
            os.path.join(save_directory, "sentence_bert_config.json"),
            {"max_seq_length": self.pipeline.max_seq_length, "do_lower_case": False},
        )


def _pooling_modes(name_or_path: str, config: dict) -> tuple[tuple[str, ...], bool]:
    modes = config.get("pooling_mode")
    if modes is None:
        modes = [mode for key, mode in _LEGACY_POOLING_KEYS.items() if config.get(key, False)] or ["mean"]
    modes = list(modes) if isinstance(modes, list) else [modes]
    unknown = [mode for mode in modes if not isinstance(mode, str) or mode not in POOLING_MODES]
    if unknown or not modes:
        raise SentencePipelineError(
            f"{name_or_path!r}: 1_Pooling config has pooling modes {unknown}; known: {POOLING_MODES}"
        )
    return tuple(modes), bool(config.get("include_prompt", True))


def _check_dense_config(name_or_path: str, path: str, config: dict) -> None:
    for key in ("in_features", "out_features"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_WIDTH:
            raise SentencePipelineError(
                f"{name_or_path!r}: Dense config in {path!r} needs an int {key} in [1, {MAX_WIDTH}], got {value!r}"
            )
    for key in ("module_input_name", "module_output_name"):
        if config.get(key, "sentence_embedding") not in ("sentence_embedding", None):
            raise SentencePipelineError(
                f"{name_or_path!r}: Dense module in {path!r} reads or writes {config[key]!r}; hf_align runs Dense "
                "layers on the sentence embedding only"
            )
    _activation_name(config, name_or_path, path)


def _activation_name(config: dict, name_or_path: str = "", path: str = "") -> str:
    """The `torch.nn` class a Dense config names (`torch.nn.modules.activation.Tanh` -> `Tanh`), checked."""
    dotted = config.get("activation_function") or "torch.nn.modules.activation.Tanh"  # sentence-transformers' default
    module, _, name = dotted.rpartition(".") if isinstance(dotted, str) else ("", "", "")
    if not module.startswith("torch.nn") or name not in ACTIVATIONS:
        raise SentencePipelineError(
            f"{name_or_path!r}: Dense module in {path!r} has activation_function={dotted!r}; hf_align runs only the "
            f"torch.nn activations {ACTIVATIONS} and never imports other code named in a config"
        )
    return name


def _inside(name_or_path: str, folder: str, entry, what: str) -> str:
    """`entry` (a path modules.json names) normalised, relative to the sentence-transformers `folder` (a local path),
    refused unless it stays inside (`hf_align.utils.safe_loading.resolve_inside`)."""
    try:
        resolve_inside(folder, entry, what)
    except ArtefactError as err:
        raise SentencePipelineError(f"{name_or_path!r}: {err}") from err
    normalised = os.path.normpath(entry).replace(os.sep, "/") if entry else ""
    return "" if normalised == "." else normalised


def _read_modules(name_or_path: str, path: str) -> list[dict]:
    """modules.json: a list of `{"idx", "type", "path", ...}` objects, by `idx`."""
    modules = _read_json(path, list)
    for module in modules:
        if not isinstance(module, dict) or not isinstance(module.get("idx", 0), int):
            raise SentencePipelineError(
                f"{name_or_path!r}: {path!r} must list modules as objects with an int 'idx', got {module!r}"
            )
    return sorted(modules, key=lambda m: m.get("idx", 0))


def _read_json(path: str, kind: type | None = None):
    """The JSON in `path`, which must be a `kind` (dict, list) when given."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, ValueError) as err:
        raise SentencePipelineError(f"cannot read {path!r} as JSON: {err}") from err
    if kind is not None and not isinstance(value, kind):
        raise SentencePipelineError(f"{path!r} must hold a JSON {kind.__name__}, got {type(value).__name__}")
    return value


def _write_json(path: str, value) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2)


def _join(folder: str, name: str) -> str:
    return "/".join(part for part in (folder, name) if part)


def _module_entry(index: int, path: str, kind: str) -> dict:
    return {"idx": index, "name": str(index), "path": path, "type": f"sentence_transformers.models.{kind}"}
