"""Batches of cached features for training: which rows each epoch visits, in which order (`CaptionSampler`), and
their features (`BatchSource`).

Caption sampling (docs/methods.md §10). A cache built from a captioned dataset holds one row per (image, caption);
COCO has five captions per image. `caption_sampling` says which rows make up an epoch:

* `"per_epoch"`: every training image once, with one of its captions drawn afresh each epoch;
* `"first"`: every training image once, always with its first caption (lowest row of the cache) — the authors' rule;
* `"all"`: every row (several captions of one image then share batches; `mask_same_image` keeps them from being
  each other's negatives);
* `"auto"`: `"per_epoch"` when some training image has several captions, else `"all"` (the same rows).

Every epoch's rows and order are a function of (seed, epoch) alone, so a resumed run sees exactly the batches the
interrupted one would have.
"""

from __future__ import annotations

from collections.abc import Iterator

import datasets
import numpy as np
import psutil
import pyarrow as pa
import torch

from ..encoders.loading import non_finite_rows
from ..features import FeatureCollator, column_array

CAPTION_SAMPLING = ("auto", "per_epoch", "first", "all")

__all__ = ["CAPTION_SAMPLING", "BatchSource", "CaptionSampler", "holds_tokens", "table_rows"]


class BatchSource:
    """Rows of a `features_for` view by index: in-memory tensors for pooled features (on `device` when it is a GPU
    with room for them); token features in memory too when they fit (`preload_tokens`), else Arrow reads per batch.

    Preloaded token features are kept as stored (fp16), zero-padded to the longest sequence of the cache, with each
    row's length; a batch is a gather cut to the batch's longest sequence plus masks built from the lengths: the same
    tensors the Arrow path (`FeatureCollator`) makes, without its per-row Python loop.

    Args:
        view: a `features_for` view (`vision_features`, `text_features`, optionally `image_id`).
        device: where training runs.
        preload_tokens: for token features, `None` loads them into memory when they take at most a quarter of the
            available RAM (and onto the GPU when they also take at most a quarter of its free memory); `True` always,
            `False` never. Pooled features are always in memory (`StreamedBatches` reads caches too large for it).

    Attributes:
        image_ids: (n_rows,) int64 image id of every row of the view, on the CPU (row index when there is no column).
        has_image_ids: whether the view has an `image_id` column; without one every row is its own image.
        preloaded: whether the features are in memory (always for pooled features).
        index_device: where `fetch` takes its `indices` without a copy: the GPU for pooled features held there (a
            step's slice and gather are then device-side), else the CPU (token batches read their lengths there).
    """

    def __init__(
        self, view: datasets.Dataset, device: torch.device | str | None = None, preload_tokens: bool | None = None
    ):
        self.view = view
        self.collate = FeatureCollator()
        self.has_image_ids = "image_id" in view.column_names
        self.image_ids = torch.as_tensor(column_array(view, "image_id") if self.has_image_ids else range(len(view)))
        self.table_rows = table_rows(view)
        self.tokens = holds_tokens(view)
        self._device_image_ids = self.image_ids
        self.index_device = torch.device("cpu")
        device = torch.device(device or "cpu")
        lengths = {}
        if self.tokens and preload_tokens is not False:
            lengths = {column: _token_lengths(view, column) for column in ("vision_features", "text_features")}
        self.preloaded = not self.tokens or bool(
            preload_tokens or (preload_tokens is None and _padded_bytes(view, lengths) <= _available_memory() // 4)
        )
        if not self.preloaded:
            self.numpy_view = view.with_format("numpy", columns=["vision_features", "text_features"])
            return
        if self.tokens:
            for column, rows in lengths.items():
                _check_real_tokens(column, rows == 0, torch.arange(len(view)), self.table_rows)
            self.vision = _padded_tokens(view, "vision_features", lengths["vision_features"])
            self.text = _padded_tokens(view, "text_features", lengths["text_features"])
            # On the CPU: a batch's longest sequence is read from them with no device sync.
            self.vision_lengths, self.text_lengths = lengths["vision_features"], lengths["text_features"]
            self._positions = torch.arange(max(self.vision.shape[1], self.text.shape[1]))
            self._device_lengths = (self.vision_lengths, self.text_lengths)
        else:
            columns = view.with_format("torch", columns=["vision_features", "text_features"])[:]
            self.vision = columns["vision_features"].float()
            self.text = columns["text_features"].float()
        # Checked once here (cheap, in memory) so a bad row stops the run before step 0, not at step 5,000.
        check_finite_rows(
            {"vision_features": self.vision, "text_features": self.text}, torch.arange(len(view)), self.table_rows
        )
        # On a GPU a step's batch is then a device-side gather, not a host gather plus a host-to-device copy.
        if device.type == "cuda" and self.vision.nbytes + self.text.nbytes <= torch.cuda.mem_get_info(device)[0] // 4:
            self.vision, self.text = self.vision.to(device), self.text.to(device)
            self._device_image_ids = self.image_ids.to(device)
            if self.tokens:
                self._device_lengths = (self.vision_lengths.to(device), self.text_lengths.to(device))
                self._positions = self._positions.to(device)
            else:
                self.index_device = self.vision.device

    def __len__(self) -> int:
        return len(self.view)

    def fetch(self, indices: torch.Tensor, with_image_ids: bool = False) -> dict:
        """The batch of view rows `indices` (B,): `vision_features`, `text_features` (+ masks for tokens),
        `return_loss=True`, and with `with_image_ids` (for same-image masking) their `image_ids` (B,) when the view
        has an `image_id` column (without one no two rows share an image: there is nothing to mask)."""
        with_image_ids = with_image_ids and self.has_image_ids
        if self.preloaded:
            on_device = indices.to(self.vision.device, non_blocking=True)
            if self.tokens:
                batch = self._token_batch(indices.cpu(), on_device)
            else:
                batch = {"vision_features": self.vision[on_device], "text_features": self.text[on_device]}
            batch["return_loss"] = True
            if with_image_ids:
                batch["image_ids"] = self._device_image_ids[on_device]
            return batch
        rows = self.numpy_view[indices.tolist()]
        batch = self.collate({k: list(v) for k, v in rows.items()})
        check_finite_rows({k: batch[k] for k in ("vision_features", "text_features")}, indices, self.table_rows)
        for modality in ("vision", "text"):
            if f"{modality}_mask" in batch:
                _check_real_tokens(f"{modality}_features", ~batch[f"{modality}_mask"].any(1), indices, self.table_rows)
        if with_image_ids:
            batch["image_ids"] = self.image_ids[indices]
        return batch

    def epoch_batches(
        self, sampler: CaptionSampler, epoch: int, batch_size: int, start: int = 0, with_image_ids: bool = False
    ) -> Iterator[tuple[torch.Tensor, dict]]:
        """Batches `start, start + 1, ...` of epoch `epoch`: (rows (B,), `fetch(rows)`) for consecutive slices of
        `sampler.epoch_rows(epoch)` (the last one smaller). The rows are on `index_device`: with features on the GPU
        a step's slice and gather then need no host-to-device copy."""
        rows = sampler.epoch_rows(epoch).to(self.index_device)
        for begin in range(start * batch_size, len(rows), batch_size):
            batch_rows = rows[begin : begin + batch_size]
            yield batch_rows, self.fetch(batch_rows, with_image_ids=with_image_ids)

    def _token_batch(self, indices: torch.Tensor, on_device: torch.Tensor) -> dict:
        """Preloaded token rows `indices` (B,) (on the CPU; `on_device`: the same on the features' device), cut to the
        batch's longest sequence per modality: fp32 features (B, T, d) and bool masks (B, T), as `FeatureCollator`."""
        batch = {}
        for modality, values, lengths, device_lengths in (
            ("vision", self.vision, self.vision_lengths, self._device_lengths[0]),
            ("text", self.text, self.text_lengths, self._device_lengths[1]),
        ):
            longest = int(lengths[indices].max())
            batch[f"{modality}_features"] = values[on_device, :longest].float()
            batch[f"{modality}_mask"] = self._positions[:longest] < device_lengths[on_device, None]
        return batch


def holds_tokens(view: datasets.Dataset) -> bool:
    """Whether a `features_for` view holds token features (T, d) in either modality (else pooled (d,) ones)."""
    first = view[0]
    return any(torch.as_tensor(first[column]).dim() == 2 for column in ("vision_features", "text_features"))


def _available_memory() -> int:
    """Bytes of RAM available to this process now (free plus reclaimable page cache)."""
    return psutil.virtual_memory().available


def _padded_bytes(view: datasets.Dataset, lengths: dict[str, torch.Tensor]) -> int:
    """Bytes the token columns take in memory zero-padded to their longest row, in their stored dtype."""
    total = 0
    for column, rows in lengths.items():
        feature = view.features[column]
        total += len(view) * int(rows.max()) * feature.shape[-1] * np.dtype(feature.dtype).itemsize
    return total


def _token_arrays(view: datasets.Dataset, column: str, chunk_rows: int = 65536):
    """A token column as Arrow list arrays (row -> token -> value) of `chunk_rows` rows each, in view order (a
    `select` / `filter` index mapping honoured)."""
    table = view.with_format("arrow", columns=[column])
    for start in range(0, len(view), chunk_rows):
        array = table[start : start + chunk_rows][column].combine_chunks()
        yield array.storage if isinstance(array, pa.ExtensionArray) else array


def _token_lengths(view: datasets.Dataset, column: str) -> torch.Tensor:
    """(n,) int64 number of tokens in each row of a token column (from the Arrow offsets)."""
    return torch.from_numpy(np.concatenate([np.diff(a.offsets.to_numpy()) for a in _token_arrays(view, column)]))


def _padded_tokens(view: datasets.Dataset, column: str, lengths: torch.Tensor) -> torch.Tensor:
    """A token column in memory: (n, T_max, d) in its stored dtype (fp16 in caches `extract_features` writes),
    zero-padded; `lengths` (n,) its rows' token counts. No per-row Python loop: a chunk's real tokens are one flat
    Arrow array, written through the (rows, T_max) mask of real positions."""
    dim = view.features[column].shape[-1]
    stored = np.dtype(view.features[column].dtype)
    padded = torch.from_numpy(np.zeros((len(view), int(lengths.max()), dim), dtype=stored))
    real = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
    start = 0
    for array in _token_arrays(view, column):
        stop = start + len(array)
        values = np.array(array.flatten().flatten().to_numpy(zero_copy_only=False), dtype=stored)
        padded[start:stop][real[start:stop]] = torch.from_numpy(values).view(-1, dim)
        start = stop
    return padded


def table_rows(view: datasets.Dataset) -> np.ndarray | None:
    """(n,) int64: the row of the cache's Arrow table behind each row of `view`, when `view` is a `select` /
    `filter` / `shuffle` of a cache (a split, a subset); None when its rows are the table's own."""
    return None if view._indices is None else view._indices.column(0).to_numpy().astype(np.int64)


def _named_rows(rows: list[int], table: np.ndarray | None) -> str:
    """`rows` (rows of the features given to `train()`) as an error names them: with the cache's own rows when the
    features are a selection of it, so a bad row is found in the cache, not only in the selection."""
    shown = rows[:10]
    if table is None:
        return f"rows {shown}"
    return f"rows {shown} of the features given (rows {table[shown].tolist()} of the cache they were selected from)"


def check_finite_rows(columns: dict[str, torch.Tensor], rows: torch.Tensor, table: np.ndarray | None) -> None:
    """Refuse NaN/Inf features (one such row makes the whole batch's InfoNCE NaN), naming the rows (`rows`: the
    view rows of `columns`' rows; `table`: `table_rows` of the view)."""
    for name, values in columns.items():
        bad = non_finite_rows(values)
        if bad:
            raise ValueError(
                f"the feature cache holds NaN or Inf in {name} of {len(bad)} row(s), e.g. "
                f"{_named_rows(rows[bad].tolist(), table)}; re-extract them or drop them (features.filter / "
                "features.select) before training or evaluating"
            )


def _check_real_tokens(column: str, empty: torch.Tensor, rows: torch.Tensor, table: np.ndarray | None) -> None:
    """Refuse token rows with no token (`empty`: (n,) bool over `rows`, the view rows; `table`: `table_rows` of the
    view): token methods pool over a row's tokens, and the model's own check of this is skipped in training (a device
    sync per step)."""
    if bool(empty.any()):
        bad = rows[empty].tolist()
        raise ValueError(
            f"the feature cache holds {len(bad)} row(s) with no token in {column}, e.g. {_named_rows(bad, table)}; "
            "drop them (features.filter / features.select) before training"
        )


class CaptionSampler:
    """The training rows of each epoch, in a seeded random order.

    Args:
        rows: (n,) the training rows (view row indices).
        image_ids: (n,) the image id of each of those rows.
        sampling: one of `CAPTION_SAMPLING` (see the module docstring); `"auto"` is resolved here.
        seed: the run's seed; epoch e's rows depend on (seed, e) only.

    Attributes:
        sampling: the resolved rule (`per_epoch`, `first` or `all`).
        rows_per_epoch: rows one epoch visits: the number of training images, or of rows for `all`.
        repeats_images: whether an epoch (hence a batch) can hold two rows of one image: only `all` with an image
            that has several captions. Otherwise same-image masking has nothing to mask in training batches.
    """

    def __init__(self, rows: torch.Tensor, image_ids: torch.Tensor, sampling: str, seed: int):
        if sampling not in CAPTION_SAMPLING:
            raise ValueError(f"caption_sampling must be one of {CAPTION_SAMPLING}, got {sampling!r}")
        if rows.shape != image_ids.shape or rows.dim() != 1:
            raise ValueError(
                f"rows and image_ids must be two (n,) tensors, got shapes {tuple(rows.shape)} and "
                f"{tuple(image_ids.shape)}"
            )
        self.seed = seed
        rows, order = rows.sort()  # "first" = the image's lowest cache row
        image_ids = image_ids[order]
        _, owner, counts = torch.unique(image_ids, return_inverse=True, return_counts=True)
        if sampling == "auto":
            sampling = "per_epoch" if bool((counts > 1).any()) else "all"
        self.sampling = sampling
        self.rows = rows
        # Rows grouped by image (stable: ascending rows within an image); image k's rows start at starts[k].
        self._grouped = rows[torch.argsort(owner, stable=True)]
        self._counts = counts
        self._starts = torch.cumsum(counts, 0) - counts
        self.rows_per_epoch = len(rows) if sampling == "all" else len(counts)
        self.repeats_images = sampling == "all" and bool((counts > 1).any())

    def check_negatives(self, batch_size: int, masked: bool) -> None:
        """Refuse training pairs that give no row of any batch a negative: InfoNCE would then be 0 at every step and
        the aligner saved untrained. That happens with batches of one pair, with one row per epoch (one image, one
        caption drawn per epoch), and, when captions of one image are not each other's negatives (`masked`), with
        rows of one image only.

        Args:
            batch_size: pairs in a (global) batch.
            masked: whether training batches mask same-image pairs (`mask_same_image` with `repeats_images`).
        """
        images = len(self._counts)
        candidates = images if masked else self.rows_per_epoch  # rows of an epoch that can be each other's negatives
        if batch_size >= 2 and candidates >= 2:
            return
        counts = f"{len(self.rows)} training row(s) of {images} distinct `image_id` value(s)"
        if candidates >= 2:
            why = f"a batch holds {batch_size} pair (per_device_train_batch_size x processes); use at least 2"
        elif masked:
            why = (
                f"{counts}, and mask_same_image=True keeps captions of one image from being each other's negatives; "
                "train on at least 2 images (or set mask_same_image=False)"
            )
        else:
            why = (
                f"caption_sampling={self.sampling!r} visits {self.rows_per_epoch} row per epoch ({counts}); train on "
                "at least 2 images"
            )
        raise ValueError(f"the training pairs give no row a negative, so InfoNCE would be 0 at every step: {why}")

    def epoch_rows(self, epoch: int) -> torch.Tensor:
        """(rows_per_epoch,) the rows of epoch `epoch` in visiting order (epoch −1: the order `init_from_data` uses)."""
        generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        if self.sampling == "all":
            return self.rows[torch.randperm(len(self.rows), generator=generator)]
        if self.sampling == "first":
            chosen = self._grouped[self._starts]
        else:
            offsets = (torch.rand(len(self._counts), generator=generator, dtype=torch.float64) * self._counts).long()
            chosen = self._grouped[self._starts + torch.minimum(offsets, self._counts - 1)]
        return chosen[torch.randperm(len(chosen), generator=generator)]
