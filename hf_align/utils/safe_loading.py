"""Loading an artefact safely: safetensors only, nothing read from outside its folder, nothing allocated that its
weights do not justify, and a checkpoint must fill exactly the aligner its config describes.

transformers only warns about missing, unexpected or mis-shaped weights and would leave them random; unpickling a
`pytorch_model.bin` can run arbitrary code; a `config.json` asking for a width its weights do not have makes
transformers allocate that width before it notices; a path read from a file (`modules.json`, a shard index) can name
`../` or a symlink out of the folder. All are refused here, with `ArtefactError` naming the file and the entry. This
module sits below every loader (sentence-transformers folders, encoders, LoRA adapters, the aligner, feature caches)
and imports nothing of hf_align; the aligner's own check of its config against its weights' headers
(`check_weights_fit_config`) is in `hf_align.model.aligner_parts`. See SECURITY.md.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from safetensors import SafetensorError, safe_open

BUNDLE_SUBFOLDERS = {"vision": "vision_encoder", "text": "text_encoder"}
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
SAFE_WEIGHTS = "model.safetensors"
SAFE_WEIGHTS_INDEX = "model.safetensors.index.json"
# What `from_pretrained` forwards to `cached_file` to find a repo's files (download options, not model options).
DOWNLOAD_KWARGS = ("revision", "subfolder", "token", "cache_dir", "local_files_only", "force_download", "proxies")
# `from_pretrained` keywords that are not config fields (any other keyword overrides a field of the config).
LOADING_KWARGS = {
    *DOWNLOAD_KWARGS,
    *("config", "dtype", "torch_dtype", "use_safetensors", "ignore_mismatched_sizes", "variant", "device_map"),
    *("weights_only", "output_loading_info", "attn_implementation"),
}


class ArtefactError(OSError, ValueError):
    """A file of a folder or Hub repo being loaded (aligner, bundled encoder, sentence-transformers module, LoRA
    adapter) is unsafe, damaged, or does not fit its config; the message names the file and the entry.

    Both an `OSError` (a file could not be used, as transformers reports missing files) and a `ValueError` (what
    hf_align raised for weights that do not match their config before this class existed).
    """


# ---------------------------------------------------------------------------------------------------- paths
def resolve_inside(root: str | os.PathLike, entry, what: str) -> str:
    """The path of `entry`, a relative path read from an artefact (a `modules.json` module path, a shard name), under
    the artefact's folder `root`; `ArtefactError` naming `what`, the entry and the folder unless it stays inside.

    Refused: a non-str entry, an absolute path, a `..` that climbs out, and a path whose `os.path.realpath` (symlinks
    followed) lies outside `realpath(root)`. A file of a Hub cache snapshot (`.../snapshots/<40-hex commit>/...`)
    may link into that repo's own `blobs/` folder: that is how huggingface_hub stores what it downloaded. The path
    need not exist (a Hub file is checked before it is downloaded).
    """
    root = os.fspath(root)
    if not isinstance(entry, str) or "\x00" in entry:
        raise ArtefactError(f"{what} must be a relative path (str) inside {root!r}, got {entry!r}")
    normalised = os.path.normpath(entry) if entry else ""
    if os.path.isabs(entry) or normalised == ".." or normalised.startswith(".." + os.sep):
        raise ArtefactError(
            f"{what} {entry!r} points outside {root!r}: an artefact may only name paths inside its own folder"
        )
    path = os.path.join(root, normalised) if normalised not in ("", ".") else root
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if not (_is_within(real, real_root) or _is_within(real, _hub_blobs(real_root))):
        raise ArtefactError(
            f"{what} {entry!r} resolves to {real!r}, outside {root!r} (a symlink?): an artefact may only name paths "
            "inside its own folder"
        )
    return path


def _is_within(path: str, folder: str | None) -> bool:
    return folder is not None and (path == folder or path.startswith(folder.rstrip(os.sep) + os.sep))


def _hub_blobs(real_root: str) -> str | None:
    """`<repo cache>/blobs` when `real_root` is (in) a Hub cache snapshot `<repo cache>/snapshots/<40-hex commit>`."""
    parts = Path(real_root).parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", parts[i + 1]):
            blobs = os.path.join(*parts[:i], "blobs")
            return blobs if os.path.isdir(blobs) else None
    return None


# ---------------------------------------------------------------------------------------------------- weights
def safetensors_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the header of the safetensors file `path` (no tensor is read or allocated).

    A truncated or damaged file is an `ArtefactError` naming it (safetensors' own error names no file).
    """
    try:
        with safe_open(path, framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtefactError(
            f"{path!r} is not a readable safetensors file ({err}): it is truncated or damaged; download or save it "
            "again"
        ) from err


def weight_shapes(
    path: str | os.PathLike, filename: str = SAFE_WEIGHTS, index: str | None = SAFE_WEIGHTS_INDEX, **download
) -> dict[str, dict[str, tuple[int, ...]]] | None:
    """The shapes in a folder's or Hub repo's safetensors weights, by file: `filename`, else the shards its `index`
    lists (each must lie inside the folder). `None` when it has neither (the caller's loader then says so).

    `download`: `DOWNLOAD_KWARGS` (`subfolder`, `revision`, ...), as `from_pretrained` takes them.
    """
    single = repo_file(path, filename, **download)
    if single is not None:
        return {single: safetensors_shapes(single)}
    index_file = repo_file(path, index, **download) if index else None
    if index_file is None:
        return None
    try:
        with open(index_file, encoding="utf-8") as handle:
            weight_map = json.load(handle)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ArtefactError(f"{index_file!r} is not a safetensors shard index (no weight_map of names): {err}") from err
    shapes = {}
    for shard in shards:
        local = resolve_inside(os.path.dirname(index_file), shard, f"shard of {index_file!r}")
        if not os.path.isfile(local):  # a Hub shard not downloaded yet (its name was checked above)
            local = repo_file(path, os.path.normpath(shard), **download)
        if local is None:
            raise ArtefactError(f"{index_file!r} lists the shard {shard!r}, which the repo does not have")
        shapes[local] = safetensors_shapes(local)
    return shapes


def repo_file(path: str | os.PathLike, filename: str, **download) -> str | None:
    """Local path of `filename` (in `download["subfolder"]`) of a folder or Hub repo (downloaded when online), or
    `None` when it has none. `download`: `DOWNLOAD_KWARGS`."""
    path = os.fspath(path)
    subfolder = download.get("subfolder") or ""
    if os.path.isdir(path):
        local = os.path.join(path, subfolder, filename)
        return local if os.path.isfile(local) else None
    from transformers.utils import cached_file

    options = {k: v for k, v in download.items() if k in DOWNLOAD_KWARGS and v is not None}
    return cached_file(
        path,
        filename,
        **options,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
    )


def shape_mismatches(expected: dict[str, tuple], found: dict[str, tuple]) -> dict:
    """What `check_loading_info` reports, computed from shapes alone (`missing_keys`, `unexpected_keys`,
    `mismatched_keys` as `(name, checkpoint shape, config shape)`), before anything is built."""
    return {
        "missing_keys": sorted(set(expected) - set(found)),
        "unexpected_keys": sorted(set(found) - set(expected)),
        "mismatched_keys": [
            (name, found[name], shape) for name, shape in sorted(expected.items()) if found.get(name, shape) != shape
        ],
    }


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
        raise ArtefactError(
            f"the aligner weights at {os.fspath(path)!r} do not match its config.json (method, method_config or "
            f"layer widths differ from what the weights were trained with): {details}"
        )


def _describe_key(key) -> str:
    # mismatched keys come as (name, checkpoint shape, model shape)
    if isinstance(key, tuple) and len(key) == 3:
        return f"{key[0]} (checkpoint {tuple(key[1])}, config {tuple(key[2])})"
    return str(key)


# ---------------------------------------------------------------------------------------------------- pickles
def raise_if_pickle_only(path, kwargs: dict, err: OSError) -> None:
    """After transformers found no safetensors weights: say so in our words when the repo holds pickle ones."""
    pickle_file = _pickle_checkpoint(path, kwargs)
    if pickle_file is not None:
        raise OSError(
            f"{os.fspath(path)!r} holds only a pickle checkpoint ({pickle_file}) and no model.safetensors; hf_align "
            "refuses pickle weights because loading them can run arbitrary code. If you trust its author, convert it: "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')"
        ) from err


def _pickle_checkpoint(path, kwargs: dict, names: tuple[str, ...] = PICKLE_WEIGHTS) -> str | None:
    """The pickle weight file (one of `names`) a repo or folder holds, for the refusal message, or None."""
    subfolder = kwargs.get("subfolder") or ""
    if os.path.isdir(path):
        found = [f for f in names if os.path.isfile(os.path.join(path, subfolder, f))]
        return (f"{subfolder}/{found[0]}" if subfolder else found[0]) if found else None
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    for filename in names:
        name = f"{subfolder}/{filename}" if subfolder else filename
        if isinstance(huggingface_hub.try_to_load_from_cache(str(path), name, revision=kwargs.get("revision")), str):
            return name
        try:
            if huggingface_hub.file_exists(str(path), name, revision=kwargs.get("revision"), token=kwargs.get("token")):
                return name
        except (HfHubHTTPError, OSError, ValueError):  # offline or no such repo: only the original error remains
            continue
    return None


def require_safetensors(path, filename: str, pickle_name: str, what: str, **download) -> dict[str, tuple[int, ...]]:
    """The header shapes of `filename` in a folder or Hub repo (`download`: `subfolder`, `revision`, ...), where
    `what` (e.g. "the vision LoRA adapter") must be stored; `ArtefactError` naming the file when it is absent (saying
    so when only the pickle `pickle_name` is there, which is never unpickled) or damaged."""
    shapes = weight_shapes(path, filename, None, **download)
    if shapes is not None:
        return next(iter(shapes.values()))
    where = "/".join(p for p in (download.get("subfolder") or "", filename) if p)
    pickle_file = _pickle_checkpoint(os.fspath(path), download, (pickle_name,))
    found = f"only a pickle file ({pickle_file})" if pickle_file else "no such file"
    raise ArtefactError(
        f"{os.fspath(path)!r}: {what} must be stored as {where}, found {found}; hf_align loads safetensors only, since "
        "unpickling can run arbitrary code. If you trust its author, convert it: "
        "safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')"
    )


__all__ = [
    "BUNDLE_SUBFOLDERS",
    "ArtefactError",
    "check_loading_info",
    "raise_if_pickle_only",
    "repo_file",
    "require_safetensors",
    "resolve_inside",
    "safetensors_shapes",
    "shape_mismatches",
    "weight_shapes",
]
