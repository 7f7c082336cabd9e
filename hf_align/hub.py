"""Uploading a saved aligner to the Hugging Face Hub (what `AlignerModel.push_to_hub`, `save_pretrained(...,
push_to_hub=True)` and `hf-align push` do).

One commit carries every file `save_pretrained` wrote, except training leftovers, and a `README.md` regenerated for
the repository: the card is rendered by the model's own card data (`model.model_card_data`), so this module imports
neither the model (type annotations only) nor the card module.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

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

    Every file goes up except training leftovers (`checkpoint-*/`, `runs/`, hidden files); `README.md` is
    regenerated for `repo_id` so the card's usage snippet names the repo, with `tags` added to its YAML. `revision`
    is a branch (created if missing) or a `refs/pr/*` ref. Returns the `huggingface_hub.CommitInfo`.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    from .version import __version__

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


def uploaded_files(folder: str | os.PathLike) -> list[str]:
    """Repo paths (POSIX) of the files under `folder` that an upload sends: all but checkpoints (`checkpoint-*/`) and
    logs (`runs/`) at the top level and hidden files and folders anywhere. Each folder's files come sorted, before its
    subfolders'."""
    folder = os.fspath(folder)
    paths = []
    for root, directories, files in os.walk(folder):
        relative = os.path.relpath(root, folder)
        top_level = relative == "."
        directories[:] = sorted(
            d
            for d in directories
            if not d.startswith(".") and not (top_level and (d.startswith("checkpoint-") or d == "runs"))
        )
        for name in sorted(files):
            if not name.startswith("."):
                paths.append(name if top_level else "/".join([*relative.split(os.sep), name]))
    return paths


__all__ = ["upload_aligner", "uploaded_files"]
