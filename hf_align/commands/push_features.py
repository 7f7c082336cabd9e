"""`hf-align push-features`: upload a feature cache folder to a Hub dataset repo, with a dataset card."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import CommandSpec


@dataclass
class PushFeaturesArguments:
    cache: str = field(metadata={"help": "Feature cache folder written by extract_features / hf-align extract."})
    repo_id: str = field(metadata={"help": "Hub dataset repository to create or update, e.g. user/coco-features."})
    private: bool = field(default=False, metadata={"help": "Create the repository as private (if it does not exist)."})
    source_dataset: str | None = field(
        default=None, metadata={"help": "Hub id of the dataset the features were extracted from (for the card)."}
    )
    source_license: str | None = field(
        default=None, metadata={"help": "Its licence, a Hub licence id such as cc-by-4.0 (the card's license)."}
    )
    revision: str | None = field(default=None, metadata={"help": "Branch to push to (created if missing)."})
    commit_message: str | None = field(default=None, metadata={"help": "Default: 'Upload hf_align feature cache'."})


def run(args: PushFeaturesArguments) -> int:
    from ..features.hub import push_features

    info = push_features(
        args.cache,
        args.repo_id,
        private=args.private or None,  # unset: an existing repo keeps its visibility, a new one is public
        revision=args.revision,
        source_dataset=args.source_dataset,
        source_license=args.source_license,
        commit_message=args.commit_message,
    )
    print(f"pushed {args.cache} to {info.commit_url}")
    return 0


COMMAND = CommandSpec("push-features", __doc__.split(": ", 1)[1], (PushFeaturesArguments,), run)
