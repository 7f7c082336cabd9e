"""Training batches streamed from a pooled feature cache's Arrow files, for caches larger than memory.

`train()` holds a pooled cache's two feature columns in memory when they fit (`BatchSource`); past a quarter of the
available memory it streams them instead (`training_batches` decides and logs which). A stream reads the cache's Arrow
files (`view.cache_files`: one file, or the shards of a sharded cache in order) record batch by record batch:

* **Block shuffling.** The files' record batches, grouped into blocks of at least `BLOCK_ROWS` rows, are read in an
  order drawn per epoch: the shard order changes every epoch, and so does the order of the blocks of one big file.
  Each block is read through a memory map opened for it alone and closed after it: only the pages of the two columns
  a model reads (of the rows an epoch needs) are touched, and they leave the process's resident set with the map.
* **A shuffle buffer** of `shuffle_buffer_size` rows: rows read go into it, and whenever it is full a batch is drawn
  from it at random; at the end of the epoch what is left is drawn in a random order.

An epoch yields exactly the rows of `CaptionSampler.epoch_rows(epoch)` (the view's training rows, one caption per
image with `per_epoch` / `first` sampling), each once, in batches of `batch_size` (the last one smaller): the same
rows and number of batches as in memory, in another order. Both orders are functions of (seed, epoch) alone, so a
resumed run sees exactly the batches of an uninterrupted one, and with several processes every process reads the
same stream: the global batch is the one a single process would train on, and each process embeds its slice of it.
Rows by index (validation, `init_from_data`) are read the same way, block by block (`fetch`).

Memory: the buffer (`shuffle_buffer_size × (d_vision + d_text) × 4` bytes; 512 MiB for 65,536 rows of 1024-d
features) plus one record batch's rows, whatever the cache's size; besides, index arrays of 8 bytes per row (the
view's row mapping, the epoch's rows in file order, image ids; with the validation split's and the caption sampler's
own, about 0.2 KB per row at their peak).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets.table import ConcatenationTable, MemoryMappedTable
from transformers.utils import logging

from ..features import column_array
from ..utils.checks import check_positive_int
from . import batches
from .batches import BatchSource, CaptionSampler, holds_tokens

logger = logging.get_logger(__name__)

DEFAULT_SHUFFLE_BUFFER_SIZE = 65536
# Consecutive record batches are read as one block of at least this many rows: the unit of the block shuffle (small
# record batches would otherwise cost a seek and a memory map each).
BLOCK_ROWS = 1024
# What `datasets` may have done to a memory-mapped table that keeps its rows and only picks or renames columns: a
# stream replays these on the file's column names. Anything else (a cast, a flatten, an added column) cannot be read
# back from the file as it is.
_COLUMN_REPLAYS = ("select", "drop", "remove_column", "rename_columns", "replace_schema_metadata", "combine_chunks")
_FEATURES = ("vision_features", "text_features")

__all__ = ["DEFAULT_SHUFFLE_BUFFER_SIZE", "NotStreamable", "RowSource", "StreamedBatches", "training_batches"]


class NotStreamable(ValueError):
    """The view's rows are not plain rows of Arrow files on disk (an in-memory table, a cast column, ...)."""


@dataclass
class _Part:
    """Rows `[file_start, file_stop)` of the Arrow stream file `path`, rows `[data_start, ...)` of the view's table;
    `columns`: the file's names of the view's `vision_features` and `text_features`; `record_batches`: the file's
    (byte offset, rows) of each record batch."""

    path: str
    schema: pa.Schema
    columns: tuple[str, str]
    file_start: int
    file_stop: int
    data_start: int
    record_batches: list[tuple[int, int]]


@dataclass
class _Block:
    """Consecutive record batches of one part: `batches` = (byte offset, file row of its first row, first and stop
    rows of the view's table it holds); the block holds table rows `[data_start, data_stop)`."""

    part: int
    data_start: int
    data_stop: int
    batches: list[tuple[int, int, int, int]]


class StreamedBatches:
    """A pooled `features_for` view read from its Arrow files without holding it in memory (see the module
    docstring): each epoch's training batches streamed (`epoch_batches`), and rows by index (`fetch`: validation and
    `init_from_data` rows), for `train()` on caches larger than memory. The same interface as `BatchSource`.

    Args:
        view: a `features_for` view of a cache loaded from disk (`load_cache`, `datasets.load_from_disk`,
            `Dataset.from_file`), with pooled `vision_features` / `text_features`; `select` / `filter` index mappings
            and slices are honoured.
        shuffle_buffer_size: rows of the shuffle buffer (no more than an epoch's rows, at least one batch, are kept).

    Attributes:
        image_ids: (n_rows,) int64 image id of every row of the view, on the CPU (row index when there is no column).
        has_image_ids: whether the view has an `image_id` column; without one every row is its own image.

    Raises:
        NotStreamable (a `ValueError`): when the view is not a selection of rows and columns of Arrow files on disk.
    """

    def __init__(self, view: datasets.Dataset, shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER_SIZE):
        self.shuffle_buffer_size = check_positive_int("shuffle_buffer_size", shuffle_buffer_size)
        self.parts = _parts(view)
        self.has_image_ids = "image_id" in view.column_names
        self.image_ids = torch.as_tensor(column_array(view, "image_id") if self.has_image_ids else range(len(view)))
        # view row -> row of the view's (unindexed) table; None: the same row
        self.table_rows = batches.table_rows(view)
        self.blocks = [block for index, part in enumerate(self.parts) for block in _blocks(index, part)]
        self._block_starts = np.array([block.data_start for block in self.blocks])
        self.dims = tuple(len(view[0][column]) for column in _FEATURES)

    def __len__(self) -> int:
        return len(self.image_ids)

    def epoch_batches(
        self, sampler: CaptionSampler, epoch: int, batch_size: int, start: int = 0, with_image_ids: bool = False
    ) -> Iterator[tuple[torch.Tensor, dict]]:
        """Batches `start, start + 1, ...` of epoch `epoch`: (view rows (B,), batch) pairs, the batch as `fetch` makes
        it.

        The rows are `sampler.epoch_rows(epoch)` as a set; their order comes from (`sampler.seed`, `epoch`). A
        resumed epoch (`start > 0`) replays the stream from its beginning, drawing and dropping the first `start`
        batches: that costs a read of the part of the epoch already trained on (no batch is built for it).
        """
        table_rows, view_rows = self._in_file_order(sampler.epoch_rows(epoch).numpy())
        rng = np.random.default_rng([sampler.seed & 0xFFFFFFFFFFFFFFFF, epoch])
        # No bigger than the epoch (a buffer holding the whole epoch is a full shuffle), no smaller than a batch
        capacity = max(min(self.shuffle_buffer_size, len(view_rows)), batch_size)
        buffer = _ShuffleBuffer(capacity, self.dims, batch_size, rng, skip=start)
        for index in rng.permutation(len(self.blocks)):
            block = self.blocks[index]
            low, high = np.searchsorted(table_rows, [block.data_start, block.data_stop])
            if low == high:  # no row of this epoch here (validation rows, a small subset): not read at all
                continue
            for vision, text, rows in self._read(block, table_rows[low:high], view_rows[low:high]):
                for drawn in buffer.add(vision, text, rows):
                    yield self._batch(*drawn, with_image_ids)
        for drawn in buffer.drain():
            yield self._batch(*drawn, with_image_ids)

    def fetch(self, indices: torch.Tensor, with_image_ids: bool = False) -> dict:
        """The batch of view rows `indices` (B,), read block by block in file order: `vision_features` (B, d_v) and
        `text_features` (B, d_t) float32, `return_loss=True`, and with `with_image_ids` their `image_ids` (B,) when
        the view has an `image_id` column (as `BatchSource.fetch`)."""
        rows = indices.cpu().numpy()
        table_rows, positions = self._in_file_order(np.arange(len(rows)), rows)
        vision = np.empty((len(rows), self.dims[0]), dtype=np.float32)
        text = np.empty((len(rows), self.dims[1]), dtype=np.float32)
        owners = np.searchsorted(self._block_starts, table_rows, side="right") - 1
        for index in np.unique(owners):
            low, high = np.searchsorted(owners, [index, index + 1])
            for block_vision, block_text, where in self._read(
                self.blocks[index], table_rows[low:high], positions[low:high]
            ):
                vision[where], text[where] = block_vision, block_text
        return self._batch(vision, text, rows, with_image_ids)[1]

    def _in_file_order(self, payload: np.ndarray, view_rows: np.ndarray | None = None):
        """(table rows, payload) of view rows `view_rows` (default: `payload` itself), sorted by table row: the order
        of the files, in which each block finds its rows by bisection."""
        view_rows = payload if view_rows is None else view_rows
        table_rows = view_rows if self.table_rows is None else self.table_rows[view_rows]
        order = np.argsort(table_rows, kind="stable")
        return table_rows[order], payload[order]

    def _read(self, block: _Block, table_rows: np.ndarray, payload: np.ndarray):
        """(vision (k, d_v), text (k, d_t) float32, payload (k,)) of each record batch of `block` holding some of
        `table_rows` (sorted, all in the block; `payload`: what goes with each, e.g. its view row), read through a
        memory map that lives as long as the block, so the pages read leave the resident set with it."""
        part = self.parts[block.part]
        with pa.memory_map(part.path) as source:
            for offset, file_row, data_start, data_stop in block.batches:
                low, high = np.searchsorted(table_rows, [data_start, data_stop])
                if low == high:
                    continue
                source.seek(offset)
                record = pa.ipc.read_record_batch(pa.ipc.read_message(source), part.schema)
                local = table_rows[low:high] - part.data_start + part.file_start - file_row
                vision, text = (_pooled_rows(record.column(name), local) for name in part.columns)
                yield vision, text, payload[low:high]

    def _batch(self, vision: np.ndarray, text: np.ndarray, rows: np.ndarray, with_image_ids: bool):
        batch_rows = torch.from_numpy(rows)
        batch = {"vision_features": torch.from_numpy(vision), "text_features": torch.from_numpy(text)}
        # In memory the whole cache is checked once at load; streamed, each batch is checked as it is read, in numpy
        # (torch.isfinite on the CPU takes ~50x longer), the rows named by the shared check when one fails.
        if not (np.isfinite(vision).all() and np.isfinite(text).all()):
            batches.check_finite_rows(batch, batch_rows, self.table_rows)
        batch["return_loss"] = True
        if with_image_ids and self.has_image_ids:
            batch["image_ids"] = self.image_ids[batch_rows]
        return batch_rows, batch


class _ShuffleBuffer:
    """Rows waiting to be drawn into batches of `batch_size`: (capacity, d) feature arrays and their view rows, the
    first `size` filled. Every draw comes from `rng`, so the batches are a function of the rows added and the
    generator's seed. The first `skip` batches are drawn (the buffer evolves as it did) but not copied out: a resumed
    epoch's batches already trained on."""

    def __init__(self, capacity: int, dims: tuple[int, int], batch_size: int, rng: np.random.Generator, skip: int):
        self.vision = np.empty((capacity, dims[0]), dtype=np.float32)
        self.text = np.empty((capacity, dims[1]), dtype=np.float32)
        self.rows = np.empty(capacity, dtype=np.int64)
        self.size, self.batch_size, self.rng, self.skip, self.drawn = 0, batch_size, rng, skip, 0

    def add(self, vision: np.ndarray, text: np.ndarray, rows: np.ndarray):
        """Add rows (k, d_v), (k, d_t), (k,); each time the buffer fills, draw a batch from it at random and yield it
        as (vision, text, rows) unless it is one of the first `skip`."""
        capacity, done = len(self.rows), 0
        while done < len(rows):
            count = min(capacity - self.size, len(rows) - done)
            stop = self.size + count
            self.vision[self.size : stop] = vision[done : done + count]
            self.text[self.size : stop] = text[done : done + count]
            self.rows[self.size : stop] = rows[done : done + count]
            self.size, done = stop, done + count
            if self.size == capacity:
                drawn = self._draw()
                if drawn is not None:
                    yield drawn

    def _draw(self):
        picked = self.rng.choice(self.size, self.batch_size, replace=False)
        self.drawn += 1
        kept = self.drawn > self.skip
        drawn = (self.vision[picked], self.text[picked], self.rows[picked]) if kept else None
        # Fill the holes below the new end with the rows above it that were not drawn (as many as there are holes).
        end = self.size - self.batch_size
        holes = picked[picked < end]
        tail = np.ones(self.batch_size, dtype=bool)
        tail[picked[picked >= end] - end] = False
        movers = np.arange(end, self.size)[tail]
        for array in (self.vision, self.text, self.rows):
            array[holes] = array[movers]
        self.size = end
        return drawn

    def drain(self):
        """What is left, in a random order, in batches of `batch_size` (the last one smaller), skipped ones left out."""
        order = self.rng.permutation(self.size)
        for start in range(max(self.skip - self.drawn, 0) * self.batch_size, self.size, self.batch_size):
            picked = order[start : start + self.batch_size]
            yield self.vision[picked], self.text[picked], self.rows[picked]


def _pooled_rows(column: pa.Array, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` of a pooled feature column (fixed-size or equal-length lists of floats) as a (k, d) float32 copy;
    only those rows' bytes are read."""
    if pa.types.is_fixed_size_list(column.type):
        width = column.type.list_size
    elif pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        lengths = np.diff(column.offsets.to_numpy())
        width = int(lengths[0]) if len(lengths) else 0
        if (lengths != width).any():
            raise ValueError(f"a pooled feature column holds lists of different lengths ({sorted(set(lengths))})")
    else:
        raise ValueError(f"a pooled feature column must hold lists of floats, got Arrow type {column.type}")
    values = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), width)
    return values[rows].astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------- the view's files
def _parts(view: datasets.Dataset) -> list[_Part]:
    """The view's table as parts of Arrow files, in table order, read from how `datasets` built it: each block of a
    (concatenated) table is a memory-mapped file with the operations that made it (`replays`); row slices and column
    selections / renames are followed, anything else is refused (`NotStreamable`)."""
    table = view.data
    rows_of_blocks = table.blocks if isinstance(table, ConcatenationTable) else [[table]]
    parts, data_start, scanned = [], 0, {}
    for row in rows_of_blocks:
        if len(row) != 1 or not isinstance(row[0], MemoryMappedTable):
            raise NotStreamable(
                "its rows are not all read from Arrow files on disk (an in-memory table, e.g. from "
                "features_from_tensors or keep_in_memory=True, or columns joined from several tables)"
            )
        block = row[0]
        if block.path not in scanned:
            scanned[block.path] = _record_batches(block.path)
        schema, record_batches = scanned[block.path]
        file_start, file_stop, columns = _replay(block.replays, schema, sum(rows for _, rows in record_batches))
        if file_stop - file_start != block.num_rows:
            raise NotStreamable(
                f"{block.path} holds {file_stop - file_start} rows where the table has {block.num_rows}"
            )
        parts.append(_Part(block.path, schema, columns, file_start, file_stop, data_start, record_batches))
        data_start += block.num_rows
    return parts


def _record_batches(path: str) -> tuple[pa.Schema, list[tuple[int, int]]]:
    """The schema of the Arrow IPC stream file `path` (the format `datasets` writes) and the (byte offset, rows) of
    each of its record batches, read from the messages' metadata (the bodies are mapped, not read)."""
    try:
        with pa.memory_map(path) as source:
            reader = pa.ipc.MessageReader.open_stream(source)
            schema = pa.ipc.read_schema(reader.read_next_message())
            found = []
            while True:
                offset = source.tell()
                try:
                    message = reader.read_next_message()
                except StopIteration:
                    return schema, found
                if message.type != "record batch":
                    raise NotStreamable(f"{path} holds a {message.type} message; streaming reads record batches only")
                found.append((offset, pa.ipc.read_record_batch(message, schema).num_rows))
    except (pa.ArrowInvalid, OSError) as err:
        raise NotStreamable(f"{path} is not a readable Arrow stream file ({err})") from None


def _replay(replays, schema: pa.Schema, file_rows: int) -> tuple[int, int, tuple[str, str]]:
    """The file rows `[start, stop)` and the file's column names of `vision_features` / `text_features` after
    `datasets`' recorded operations `replays` ((method, args, kwargs) of `pyarrow.Table`): slices are composed here,
    column operations applied to a one-row stand-in table whose column j holds j."""
    stand_in = pa.table({name: [j] for j, name in enumerate(schema.names)})
    start, stop = 0, file_rows
    for method, args, kwargs in replays or ():
        if method == "slice":
            bound = {**dict(zip(("offset", "length"), args)), **kwargs}
            start = min(start + bound.get("offset", 0), stop)
            stop = stop if bound.get("length") is None else min(start + bound["length"], stop)
        elif method in _COLUMN_REPLAYS:
            stand_in = getattr(stand_in, method)(*args, **kwargs)
        else:
            raise NotStreamable(f"its table was changed by {method}(), which cannot be replayed on the cache's files")
    missing = [name for name in _FEATURES if name not in stand_in.column_names]
    if missing:
        raise NotStreamable(f"its table has no column {missing} (pass a features_for view)")
    columns = tuple(schema.names[stand_in.column(name)[0].as_py()] for name in _FEATURES)
    return start, stop, columns


def _blocks(index: int, part: _Part) -> list[_Block]:
    """The part's record batches (those holding some of its rows) grouped into blocks of at least `BLOCK_ROWS`
    rows, in file order."""
    blocks, current, file_row = [], [], 0
    for offset, rows in part.record_batches:
        first, stop = max(file_row, part.file_start), min(file_row + rows, part.file_stop)
        if first < stop:
            shift = part.data_start - part.file_start
            current.append((offset, file_row, first + shift, stop + shift))
            if current[-1][3] - current[0][2] >= BLOCK_ROWS:
                blocks.append(_Block(index, current[0][2], current[-1][3], current))
                current = []
        file_row += rows
    if current:
        blocks.append(_Block(index, current[0][2], current[-1][3], current))
    return blocks


# ---------------------------------------------------------------------------------------------- the decision
# What `train()` reads a view through: rows by index (`fetch`, `image_ids`) and each epoch's batches (`epoch_batches`).
RowSource = BatchSource | StreamedBatches


def training_batches(
    view: datasets.Dataset,
    device: torch.device | str | None = None,
    stream_features: bool | None = None,
    shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER_SIZE,
) -> RowSource:
    """Where `train()` reads a `features_for` view from, decided and logged (info level, with the sizes).

    Pooled features are held in memory when `stream_features` is `False`, or `None` and their two columns take at
    most a quarter of the available memory as float32; else they are streamed (`StreamedBatches`). Token features
    keep `BatchSource`'s own choice (in memory when they fit, else read per batch); they are not streamed.

    Returns:
        A `BatchSource` or a `StreamedBatches`: rows by index (`fetch`, `image_ids`: validation, `init_from_data`) and
        each epoch's training batches (`epoch_batches`).

    Raises:
        ValueError: `stream_features=True` with token features, or with a cache that cannot be streamed (held in
            memory, a cast column); the message says why.
    """
    if holds_tokens(view):
        if stream_features:
            raise ValueError(
                "stream_features=True streams pooled features only, and this model reads token features; use "
                "stream_features=None (token features are then read from the cache per batch when they do not fit "
                "in memory)"
            )
        source = BatchSource(view, device)
        where = "held in memory" if source.preloaded else "read from the cache per batch (too large for memory)"
        logger.info(f"training batches: token features of {len(view):,} rows, {where}")
        return source
    needed = len(view) * sum(len(view[0][column]) for column in _FEATURES) * 4
    available = batches._available_memory()
    size = f"their pooled features take {_gib(needed)} as float32 (available memory: {_gib(available)})"
    if stream_features is None and needed <= available // 4:
        logger.info(f"training batches: held in memory: {size}, at most a quarter")
        return BatchSource(view, device)
    if stream_features is False:
        logger.info(f"training batches: held in memory (stream_features=False): {size}")
        return BatchSource(view, device)
    try:
        stream = StreamedBatches(view, shuffle_buffer_size)
    except NotStreamable as err:
        if stream_features:
            raise ValueError(f"stream_features=True, but this feature cache cannot be streamed: {err}") from None
        logger.warning(f"training batches: held in memory although {size}, more than a quarter: cannot stream: {err}")
        return BatchSource(view, device)
    why = "stream_features=True" if stream_features else "more than a quarter"
    logger.info(
        f"training batches: streamed from {len(stream.parts)} Arrow file part(s) in {len(stream.blocks)} shuffled "
        f"blocks through a shuffle buffer of {stream.shuffle_buffer_size:,} rows: {size} ({why})"
    )
    return stream


def _gib(size: int) -> str:
    return f"{size / 2**30:.3g} GiB"
