"""Retrieval over large galleries in bounded memory.

The (n_queries, n_gallery) score matrix of a 200k × 1M retrieval is 800 GB in fp32; nothing here ever holds it. Both
functions walk the matrix in blocks of `query_chunk_size × chunk_size` scores:

* `topk_similarity(queries, gallery, k)`: the k best gallery items of every query, kept as a running top-k that each
  block updates (a (n_queries, k) state, merged with the block's own top-k). The gallery is the outer loop, so a
  gallery kept in (pinned) host memory crosses to the device once.
* `chunked_retrieval_metrics(image_embeds, text_embeds, text_image_index)`: recall@k both ways, the same numbers as
  `hf_align.evaluation.retrieval_metrics` on the full score matrix. A first pass reads each text's positive score
  off the blocks that hold it (only those blocks are computed), a second pass counts, per text and per image, the
  candidates scoring at least as high as the positive, the positives themselves taken off after. Both passes score
  the same blocks with the same shapes, so a positive is compared with exactly the value it was read from: it ties
  with itself exactly once, whatever the rounding of the blocks.

Scores come from a `similarity(rows_a, rows_b) -> (len(rows_a), len(rows_b))` function the caller passes, called on
one block of rows at a time (this module sits below the model and never imports it): an aligner's
`model.similarity.score_unit_norm`, the function its forward makes logits with, so recall is what the model's own
logits rank. Without one, the dot product (the cosine of L2-normalised embeddings, the `cosine` head's fast path).

Peak memory, besides the inputs: one block of scores (`query_chunk_size · chunk_size` values in the scores' dtype,
256 MiB in fp32 with the defaults) plus, for `topk_similarity`, the block's top-k and the running (n_queries, k)
values (fp32) and indices (int64); for `chunked_retrieval_metrics`, the fp32 copy of a non-fp32 block and the
comparisons of `COUNT_ROWS` rows at a time (int64 counts: 32 MiB with the defaults). A head that builds a pairwise
intermediate to score a block (`mlp`, `manhattan`, `chi_square`) bounds it itself (`max_chunk_elements`).

On a GPU, pass bf16 embeddings for a bf16 matmul (scores are returned in fp32); on CPU the functions run as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

DEFAULT_CHUNK_SIZE = 16384  # gallery rows per block
DEFAULT_QUERY_CHUNK_SIZE = 4096  # query rows per block
COUNT_ROWS = 256  # rows of a block compared at once when counting ranks

Similarity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _dot(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    return queries @ gallery.t()


@torch.no_grad()
def topk_similarity(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE,
    similarity: Similarity | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` highest-scoring gallery items of every query, in bounded memory.

    Args:
        queries: (n_q, D) embeddings; the work runs on their device.
        gallery: (n_g, D) embeddings, on the same device or in host memory (pinned host memory lets each block's copy
            overlap the previous block's work); blocks are moved to the queries' device one at a time.
        k: results per query, 1 ≤ k ≤ n_g.
        chunk_size: gallery rows per block of scores.
        query_chunk_size: query rows per block of scores.
        similarity: `f(query_rows, gallery_rows) -> (rows_q, rows_g)` scores, higher = better, called once per block;
            default the dot product (the cosine for L2-normalised embeddings). A model's head scores (images, texts):
            for image queries pass `model.similarity.score_unit_norm`, for text queries
            `lambda q, g: model.similarity.score_unit_norm(g, q).t()`.

    Returns:
        `(scores, indices)`: (n_q, k) fp32 scores sorted in decreasing order and the (n_q, k) int64 gallery rows they
        belong to. Among equal scores the order is unspecified.
    """
    for name, value in (("queries", queries), ("gallery", gallery)):
        if not isinstance(value, torch.Tensor) or value.dim() < 2:
            raise ValueError(f"{name} must be a tensor of shape (n, D), got {_describe(value)}")
    if similarity is None and queries.shape[1:] != gallery.shape[1:]:
        raise ValueError(
            f"queries and gallery must have the same width for the dot product, got {tuple(queries.shape)} and "
            f"{tuple(gallery.shape)}"
        )
    n_queries, n_gallery = queries.shape[0], gallery.shape[0]
    if not _positive_int(k) or k > n_gallery:
        raise ValueError(f"k must be an int in [1, {n_gallery}] (the gallery's size), got {k!r}")
    _check_chunks(chunk_size, query_chunk_size)
    score = similarity or _dot
    device = queries.device
    best_scores = torch.full((n_queries, k), float("-inf"), device=device)
    best_index = torch.zeros((n_queries, k), dtype=torch.long, device=device)
    filled = 0  # gallery rows seen so far: until it reaches k the running top-k is only partly filled
    for g_start in range(0, n_gallery, chunk_size):
        block_gallery = gallery[g_start : g_start + chunk_size].to(device, non_blocking=True)
        width = min(k, filled + block_gallery.shape[0])
        for q_start in range(0, n_queries, query_chunk_size):
            q_end = q_start + query_chunk_size
            scores = _scored(score, queries[q_start:q_end], block_gallery)
            top_scores, top_index = scores.topk(min(k, scores.shape[1]), dim=1)
            merged_scores = torch.cat([best_scores[q_start:q_end, : min(k, filled)], top_scores.float()], dim=1)
            merged_index = torch.cat([best_index[q_start:q_end, : min(k, filled)], top_index + g_start], dim=1)
            keep_scores, keep = merged_scores.topk(width, dim=1)
            best_scores[q_start:q_end, :width] = keep_scores
            best_index[q_start:q_end, :width] = merged_index.gather(1, keep)
            del scores  # freed before the next block is scored: one block alive at a time
        filled += block_gallery.shape[0]
    return best_scores, best_index


@torch.no_grad()
def chunked_retrieval_metrics(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_image_index: torch.Tensor | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    similarity: Similarity | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE,
) -> dict[str, float]:
    """Recall@k both ways (percent), exactly as `retrieval_metrics(similarity(image_embeds, text_embeds), ...)`,
    without ever holding the (n_images, n_texts) score matrix.

    Args:
        image_embeds: (n_images, D); text_embeds: (n_texts, D), on one device.
        text_image_index: (n_texts,) index of the image each text describes (several texts per image allowed).
        similarity: `f(image_rows, text_rows) -> (rows_i, rows_t)` scores, called once per block (an aligner's
            `model.similarity.score_unit_norm`: its logits' ranking); default the dot product.
        chunk_size: text rows per block of scores.
        query_chunk_size: image rows per block of scores.

    Same semantics as `retrieval_metrics`: rank = negatives scoring at least as high as the (best) positive (ties
    count against the query).
    """
    for name, value in (("image_embeds", image_embeds), ("text_embeds", text_embeds)):
        if not isinstance(value, torch.Tensor) or value.dim() < 2:
            raise ValueError(f"{name} must be a tensor of shape (n, D), got {_describe(value)}")
    n_images, n_texts = image_embeds.shape[0], text_embeds.shape[0]
    if n_images == 0 or n_texts == 0:
        raise ValueError(f"retrieval needs at least one image and one text, got {n_images} images and {n_texts} texts")
    device = image_embeds.device
    owner = check_text_image_index(text_image_index, n_images, n_texts, device)
    check_ks(ks)
    _check_chunks(chunk_size, query_chunk_size)
    score = similarity or _dot

    def block(i_start: int, t_start: int) -> torch.Tensor:
        images = image_embeds[i_start : i_start + query_chunk_size]
        return _scored(score, images, text_embeds[t_start : t_start + chunk_size]).float()

    # pass 1: each text's positive score, read off the only block row that holds its image
    positive = torch.empty(n_texts, device=device)
    image_block = owner // query_chunk_size
    for t_start in range(0, n_texts, chunk_size):
        texts = torch.arange(t_start, min(t_start + chunk_size, n_texts), device=device)
        for b in torch.unique(image_block[texts]).tolist():
            scores = block(b * query_chunk_size, t_start)
            here = texts[image_block[texts] == b]
            positive[here] = scores[owner[here] - b * query_chunk_size, here - t_start]
            del scores
    best_positive = torch.full((n_images,), float("-inf"), device=device)
    best_positive = best_positive.scatter_reduce(0, owner, positive, reduce="amax")
    # pass 2: candidates at or above the positive, counted block by block; the positives themselves come off after
    text_rank = torch.zeros(n_texts, dtype=torch.long, device=device)
    image_rank = torch.zeros(n_images, dtype=torch.long, device=device)
    # A NaN compares False with everything and would rank first; flagged per row, checked once (no per-block sync).
    nan_rows = torch.zeros(n_images, dtype=torch.bool, device=device)
    for i_start in range(0, n_images, query_chunk_size):
        for t_start in range(0, n_texts, chunk_size):
            t_end = min(t_start + chunk_size, n_texts)
            scores = block(i_start, t_start)
            # Counted COUNT_ROWS rows at a time: summing a whole block's comparisons would materialise it as int64.
            for r in range(0, scores.shape[0], COUNT_ROWS):
                rows = scores[r : r + COUNT_ROWS]
                images = slice(i_start + r, i_start + r + rows.shape[0])
                text_rank[t_start:t_end] += (rows >= positive[None, t_start:t_end]).sum(0)
                image_rank[images] += (rows >= best_positive[images, None]).sum(1)
                nan_rows[images] |= torch.isnan(rows).any(1)
            del scores  # freed before the next block is scored: one block alive at a time
    if bool(nan_rows.any()):
        rows = torch.nonzero(nan_rows).flatten()
        raise ValueError(f"the similarity gives NaN scores in {len(rows)} image row(s), e.g. rows {rows[:10].tolist()}")
    text_rank -= 1  # each text's own image ties with itself
    image_rank -= torch.zeros(n_images, dtype=torch.long, device=device).scatter_add(
        0, owner, (positive >= best_positive[owner]).long()
    )  # an image's captions tied with its best one are positives, not competitors
    has_caption = torch.isfinite(best_positive)
    return recall_metrics(image_rank[has_caption], text_rank, ks)


# ---------------------------------------------------------------------------------------------- shared with evaluation
def check_text_image_index(text_image_index, n_images: int, n_texts: int, device) -> torch.Tensor:
    """`text_image_index` as a (n_texts,) int64 tensor on `device`; `ValueError` unless every entry is an image row."""
    owner = torch.as_tensor(text_image_index, dtype=torch.long, device=device)
    if owner.shape != (n_texts,):
        raise ValueError(
            f"text_image_index must have shape ({n_texts},) (one image per text), got {tuple(owner.shape)}"
        )
    if owner.min() < 0 or owner.max() >= n_images:
        raise ValueError(f"text_image_index values must lie in [0, {n_images}), got [{owner.min()}, {owner.max()}]")
    return owner


def check_ks(ks: Sequence[int]) -> None:
    if any(not _positive_int(k) for k in ks):
        raise ValueError(f"ks must be positive ints, got {list(ks)}")


def recall_metrics(image_rank: torch.Tensor, text_rank: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """`image_to_text_R@k`, `text_to_image_R@k` and their mean `mean_R@k` (percent) from 0-based ranks: (n_images,)
    of each image's best caption, (n_texts,) of each text's image."""
    metrics = {}
    for k in ks:
        i2t = 100.0 * (image_rank < k).float().mean().item()
        t2i = 100.0 * (text_rank < k).float().mean().item()
        metrics[f"image_to_text_R@{k}"] = i2t
        metrics[f"text_to_image_R@{k}"] = t2i
        metrics[f"mean_R@{k}"] = (i2t + t2i) / 2
    return metrics


def _scored(score: Similarity, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """`score(rows, columns)`, refused unless it is the (len(rows), len(columns)) matrix of their pairs: a function
    scoring matched pairs, or (texts, images) for (images, texts), would otherwise rank the wrong numbers silently."""
    scores = score(rows, columns)
    expected = (rows.shape[0], columns.shape[0])
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != expected:
        got = f"shape {tuple(scores.shape)}" if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(
            f"similarity must return the {expected} matrix of every pair of its {expected[0]} and {expected[1]} "
            f"rows, got {got}"
        )
    return scores


def _check_chunks(chunk_size, query_chunk_size) -> None:
    for name, value in (("chunk_size", chunk_size), ("query_chunk_size", query_chunk_size)):
        if not _positive_int(value):
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _describe(value) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


__all__ = ["chunked_retrieval_metrics", "check_ks", "check_text_image_index", "recall_metrics", "topk_similarity"]
