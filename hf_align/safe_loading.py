"""Loading an aligner safely: safetensors only, and a checkpoint must fill exactly the aligner its config describes.

transformers only warns about missing, unexpected or mis-shaped weights and would leave them random; unpickling a
`pytorch_model.bin` can run arbitrary code. Both are refused here, in words that say what to do. See SECURITY.md.
"""

from __future__ import annotations

import os

from torch import nn

from .encoders import load_encoder

BUNDLE_SUBFOLDERS = {"vision": "vision_encoder", "text": "text_encoder"}
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def check_loading_info(path, info: dict) -> None:
    """Refuse a checkpoint that does not fill the aligner its config describes (transformers only warns)."""
    problems = {
        "missing from the checkpoint (would be random)": info.get("missing_keys"),
        "in the checkpoint but not in the model": info.get("unexpected_keys"),
        "of another shape than the config gives": info.get("mismatched_keys"),
    }
    found = {what: sorted(map(_describe_key, keys))[:10] for what, keys in problems.items() if keys}
    if found:
        details = "; ".join(f"{what}: {keys}" for what, keys in found.items())
        raise ValueError(
            f"the aligner weights at {os.fspath(path)!r} do not match its config.json (method, method_config or "
            f"layer widths differ from what the weights were trained with): {details}"
        )


def _describe_key(key) -> str:
    # mismatched keys come as (name, checkpoint shape, model shape)
    if isinstance(key, tuple) and len(key) == 3:
        return f"{key[0]} (checkpoint {tuple(key[1])}, config {tuple(key[2])})"
    return str(key)


def raise_if_pickle_only(path, kwargs: dict, err: OSError) -> None:
    """After transformers found no safetensors weights: say so in our words when the repo holds pickle ones."""
    pickle_file = _pickle_checkpoint(path, kwargs)
    if pickle_file is not None:
        raise OSError(
            f"{os.fspath(path)!r} holds only a pickle checkpoint ({pickle_file}) and no model.safetensors; hf_align "
            "refuses pickle weights because loading them can run arbitrary code. If you trust its author, convert it: "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')"
        ) from err


def _pickle_checkpoint(path, kwargs: dict) -> str | None:
    """The pickle weight file a repo or folder holds (for the refusal message), or None."""
    subfolder = kwargs.get("subfolder") or ""
    if os.path.isdir(path):
        found = [f for f in PICKLE_WEIGHTS if os.path.isfile(os.path.join(path, subfolder, f))]
        return (f"{subfolder}/{found[0]}" if subfolder else found[0]) if found else None
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    for filename in PICKLE_WEIGHTS:
        name = f"{subfolder}/{filename}" if subfolder else filename
        if isinstance(huggingface_hub.try_to_load_from_cache(str(path), name, revision=kwargs.get("revision")), str):
            return name
        try:
            if huggingface_hub.file_exists(str(path), name, revision=kwargs.get("revision"), token=kwargs.get("token")):
                return name
        except (HfHubHTTPError, OSError, ValueError):  # offline or no such repo: only the original error remains
            continue
    return None


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
