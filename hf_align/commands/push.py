"""`hf-align push`: upload a saved aligner folder (config, weights, processor files, model card) to the Hub.

Only the aligner's own files go up (`hf_align.model.hub.uploaded_files`, an allow-list): a training run's tracker logs,
checkpoints and caches in the same folder stay local."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .base import CommandSpec


@dataclass
class PushArguments:
    model_dir: str = field(metadata={"help": "Folder written by save_pretrained / hf-align train (its output_dir)."})
    repo_id: str = field(metadata={"help": "Hub repository to create or update, e.g. user/dinov2-minilm-aligner."})
    private: bool = field(default=False, metadata={"help": "Create the repository as private (if it does not exist)."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to (created if missing)."})
    commit_message: str | None = field(default=None, metadata={"help": "Default: 'Upload hf_align aligner'."})
    create_pr: bool = field(default=False, metadata={"help": "Open a pull request instead of committing."})
    tags: list[str] = field(default_factory=list, metadata={"help": "Extra tags for the model card's YAML."})


def run(args: PushArguments) -> int:
    from ..model.hub import upload_aligner
    from ..model.modeling import AlignerModel

    if not os.path.isdir(args.model_dir):
        raise ValueError(f"model_dir={args.model_dir!r} is not a folder; give the output_dir of a saved aligner")
    # The card is regenerated from the saved config and weights; the encoders are not needed for that.
    model = AlignerModel.from_pretrained(args.model_dir, load_encoders=False)
    info = upload_aligner(
        model,
        args.model_dir,
        args.repo_id,
        commit_message=args.commit_message,
        private=args.private,
        revision=args.revision,
        create_pr=args.create_pr,
        tags=args.tags,
    )
    print(f"pushed {args.model_dir} to {info.commit_url}")
    return 0


COMMAND = CommandSpec("push", __doc__.split(": ", 1)[1].split("\n", 1)[0], (PushArguments,), run)
