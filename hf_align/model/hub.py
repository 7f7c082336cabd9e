"""Uploading a saved aligner to the Hugging Face Hub (what `AlignerModel.push_to_hub`, `save_pretrained(...,
push_to_hub=True)` and `hf-align push` do).

One commit carries the files `save_pretrained` writes, named by an allow-list (`uploaded_files`), and a `README.md`
regenerated for the repository: the card is rendered by the model's own card data (`model.model_card_data`), so this
module imports neither the model (type annotations only) nor the card module.

The folder pushed is often a training run's `output_dir`, which also holds what must not be published: tracker logs
(`hf_align/` event files naming the host and process, `hparams.yml` with local paths), checkpoints with optimizer
state, caches. An allow-list, not a deny-list, so that whatever a future tool writes there stays local too.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from ..encoders.lora import ADAPTER_WEIGHTS, LORA_SUBFOLDERS
from ..utils.safe_loading import BUNDLE_SUBFOLDERS

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

    from .modeling import AlignerModel


def upload_aligner(
    model: AlignerModel,
    folder: str | os.PathLike,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    tags: Sequence[str] = (),
) -> CommitInfo:
    """Upload a folder `save_pretrained` wrote for `model` to the Hub repo `repo_id` (created if missing).

    Only the aligner's own files go up (`uploaded_files`: config, weights, processor files, bundled encoders, LoRA
    adapters), never tracker logs, checkpoints or caches; `README.md` is regenerated for `repo_id` so the card's
    usage snippet names the repo, with `tags` added to its YAML. `revision` is a branch (created if missing) or a
    `refs/pr/*` ref. Returns the `huggingface_hub.CommitInfo`.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    from ..version import __version__

    folder = os.fspath(folder)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"folder={folder!r} holds no config.json: save the aligner there with save_pretrained first")
    with open(config_path, encoding="utf-8") as handle:
        bundled = bool(json.load(handle).get("bundled_encoders", False))
    api = HfApi(library_name="hf_align", library_version=__version__)
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    operations = [
        CommitOperationAdd(path_in_repo=path, path_or_fileobj=os.path.join(folder, path))
        for path in uploaded_files(folder)
        if path != "README.md"
    ]
    card = model.model_card_data.generate_model_card(repo_id, tags, bundled)
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode("utf-8")))
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or "Upload hf_align aligner",
        commit_description=commit_description,
        token=token,
        revision=revision,
        create_pr=create_pr,
    )


# The files `save_pretrained` writes, by folder: weights (one file, or shards and their index), the processor's and
# tokenizer's files (whichever the tokenizer's kind saves), a bundled sentence-transformers encoder's module files,
# and PEFT's adapter files.
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")
_PROCESSOR = (
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
_SENTENCE_TRANSFORMERS = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
_SENTENCE_MODULE = re.compile(r"[0-9]+_[A-Za-z]+")  # 1_Pooling, 2_Dense, 3_Normalize


def _allowed_names(folders: Sequence[str]) -> tuple[str, ...]:
    """The file name patterns allowed in the folder at relative path `folders` (none: the folder is not walked)."""
    bundled, adapters = BUNDLE_SUBFOLDERS.values(), LORA_SUBFOLDERS.values()
    if not folders:
        return ("config.json", "README.md", *_WEIGHTS, *_PROCESSOR)
    if len(folders) == 1 and folders[0] in bundled:
        return ("config.json", *_WEIGHTS, *_PROCESSOR, *_SENTENCE_TRANSFORMERS)
    if len(folders) == 2 and folders[0] in bundled and _SENTENCE_MODULE.fullmatch(folders[1]):
        return ("config.json", *_WEIGHTS)
    if len(folders) == 1 and folders[0] in adapters:
        return ("adapter_config.json", ADAPTER_WEIGHTS)
    return ()


def uploaded_files(folder: str | os.PathLike) -> list[str]:
    """Repo paths (POSIX) of the files under `folder` that an upload sends: the allow-listed files of a saved aligner,
    and nothing else.

    At the top: `config.json`, `README.md`, the weights (`model.safetensors`, or its shards and index) and the
    processor and tokenizer files. In `vision_encoder/` and `text_encoder/` (bundled encoders): their config, weights,
    processor files and sentence-transformers files, and the weights and config of their numbered sentence-transformers
    modules (`1_Pooling/`, `2_Dense/`, ...). In `vision_encoder_lora/` and `text_encoder_lora/`: the LoRA adapter's
    `adapter_config.json` and `adapter_model.safetensors`. Tracker logs (`hf_align/`, `runs/`), checkpoints, caches,
    pickles and any other file stay local. Each folder's files come sorted, before its subfolders'.
    """
    folder = os.fspath(folder)
    paths = []
    for root, directories, files in os.walk(folder):
        relative = os.path.relpath(root, folder)
        folders = [] if relative == "." else relative.split(os.sep)
        # Only folders that may hold allowed files are walked (not a checkpoint or cache tree).
        directories[:] = sorted(d for d in directories if _allowed_names([*folders, d]))
        patterns = _allowed_names(folders)
        paths.extend(
            "/".join([*folders, name])
            for name in sorted(files)
            if any(fnmatchcase(name, pattern) for pattern in patterns)
        )
    return paths


__all__ = ["upload_aligner", "uploaded_files"]
