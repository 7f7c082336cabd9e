"""Blocked retrieval (hf_align.functional.retrieval): the same answers as the dense score matrix, never a block over the bound."""

import pytest
import torch
import torch.nn.functional as F

from hf_align.evaluation import retrieval_metrics
from hf_align.functional.retrieval import chunked_retrieval_metrics, topk_similarity
from hf_align.similarity import build_similarity


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


class BlockRecorder:
    """A similarity that records the shape of every block it is asked to score."""

    def __init__(self, score=lambda q, g: q @ g.t()):
        self.score, self.shapes = score, []

    def __call__(self, q, g):
        self.shapes.append((q.shape[0], g.shape[0]))
        return self.score(q, g)


@pytest.mark.parametrize("k, chunk_size, query_chunk_size", [(4, 7, 5), (10, 3, 8), (53, 16, 64), (1, 53, 1)])
def test_topk_matches_the_dense_topk_and_never_scores_more_than_a_block(k, chunk_size, query_chunk_size):
    queries, gallery = unit(37, 16, 0), unit(53, 16, 1)
    recorder = BlockRecorder()
    scores, index = topk_similarity(queries, gallery, k, chunk_size, query_chunk_size, similarity=recorder)
    dense = queries @ gallery.t()
    expected_scores, expected_index = dense.topk(k, dim=1)
    assert scores.dtype == torch.float32 and index.dtype == torch.int64 and scores.shape == index.shape == (37, k)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-6)
    assert torch.equal(index, expected_index)  # random continuous scores: no ties
    assert max(q * g for q, g in recorder.shapes) <= chunk_size * query_chunk_size
    assert sum(q * g for q, g in recorder.shapes) == 37 * 53  # every pair scored exactly once


def test_topk_with_a_head_scores_text_queries_against_an_image_gallery():
    head = build_similarity("euclidean", 8)
    images, texts = unit(30, 8, 2), unit(11, 8, 3)
    scores, index = topk_similarity(
        texts, images, 3, chunk_size=7, query_chunk_size=4, similarity=lambda q, g: head(g, q).t()
    )
    expected = head(images, texts).t().topk(3, dim=1)
    torch.testing.assert_close(scores, expected.values, rtol=0, atol=1e-6)
    assert torch.equal(index, expected.indices)
    # the best match of a text is the image closest to it: -distance, so scores are <= 0 and sorted
    assert (scores <= 0).all() and (scores[:, :-1] >= scores[:, 1:]).all()


def test_topk_in_bfloat16_returns_float32_scores_of_the_bf16_matmul():
    queries, gallery = unit(20, 32, 4).bfloat16(), unit(40, 32, 5).bfloat16()
    scores, index = topk_similarity(queries, gallery, 5, chunk_size=9, query_chunk_size=6)
    assert scores.dtype == torch.float32
    dense = (queries @ gallery.t()).float()
    torch.testing.assert_close(scores, dense.gather(1, index), rtol=0, atol=0)  # the scores of the returned items
    # bf16 rounding makes near-ties; the k-th best score is still the dense k-th best
    torch.testing.assert_close(scores[:, -1], dense.topk(5, dim=1).values[:, -1], rtol=0, atol=0)


def owners(n_images: int, captions: int) -> torch.Tensor:
    return torch.arange(n_images).repeat_interleave(captions)


@pytest.mark.parametrize("chunk_size, query_chunk_size", [(7, 5), (1, 1), (1000, 1000), (12, 40)])
def test_chunked_recall_equals_the_dense_recall(chunk_size, query_chunk_size):
    # 40 images with 3 captions each, embeddings noisy enough that recall is neither 0 nor 100
    images = unit(40, 16, 6)
    owner = owners(40, 3)
    texts = F.normalize(images[owner] + 0.9 * torch.randn(120, 16, generator=torch.Generator().manual_seed(7)), dim=-1)
    dense = retrieval_metrics(images @ texts.t(), owner, ks=(1, 5, 10))
    recorder = BlockRecorder()
    chunked = chunked_retrieval_metrics(
        images,
        texts,
        owner,
        ks=(1, 5, 10),
        similarity=recorder,
        chunk_size=chunk_size,
        query_chunk_size=query_chunk_size,
    )
    assert chunked == dense
    assert 0 < dense["text_to_image_R@1"] < 100 and 0 < dense["image_to_text_R@1"] < 100
    assert max(q * g for q, g in recorder.shapes) <= chunk_size * query_chunk_size


def test_chunked_recall_counts_exact_ties_against_the_query_like_the_dense_one():
    # integer-valued embeddings: every score is exact whatever the block shapes, so ties are true ties
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 1.0], [0.0, 3.0]])
    owner = torch.tensor([1, 0, 0, 3, 3])
    dense = retrieval_metrics(images @ texts.t(), owner, ks=(1, 2))
    # by hand (rank = other candidates scoring >= the positive): text->image ranks are 2, 3, 2, 0, 1 (text 4 ties
    # image 2 at 3); image->text: image 0's best caption (1) ties text 0 and trails text 3 -> rank 2, image 1's (1)
    # ties text 2 and trails text 3 -> rank 2, image 3's (3) tops every other caption -> rank 0
    assert dense == pytest.approx(
        {
            "image_to_text_R@1": 100 / 3,
            "text_to_image_R@1": 20.0,
            "mean_R@1": (100 / 3 + 20) / 2,
            "image_to_text_R@2": 100 / 3,
            "text_to_image_R@2": 40.0,
            "mean_R@2": (100 / 3 + 40) / 2,
        },
        rel=1e-6,
    )
    for chunk_size, query_chunk_size in [(1, 1), (2, 3), (5, 4)]:
        assert (
            chunked_retrieval_metrics(
                images, texts, owner, ks=(1, 2), chunk_size=chunk_size, query_chunk_size=query_chunk_size
            )
            == dense
        )


def test_chunked_recall_with_the_models_head_and_unmatched_images():
    head = build_similarity("bilinear", 8)
    with torch.no_grad():
        head.delta.normal_(0, 0.3, generator=torch.Generator().manual_seed(8))
    images, texts = unit(9, 8, 9), unit(6, 8, 10)
    owner = torch.tensor([0, 0, 2, 5, 5, 8])  # images 1, 3, 4, 6, 7 have no caption: left out of image->text
    dense = retrieval_metrics(head(images, texts), owner, ks=(1, 3))
    assert (
        chunked_retrieval_metrics(images, texts, owner, ks=(1, 3), similarity=head, chunk_size=4, query_chunk_size=2)
        == dense
    )


def test_bad_input_is_named():
    q, g = unit(4, 8, 0), unit(6, 8, 1)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 6\] \(the gallery's size\), got 7"):
        topk_similarity(q, g, 7)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 6\] \(the gallery's size\), got 0"):
        topk_similarity(q, g, 0)
    with pytest.raises(ValueError, match=r"chunk_size must be a positive int, got 0"):
        topk_similarity(q, g, 2, chunk_size=0)
    with pytest.raises(ValueError, match=r"query_chunk_size must be a positive int, got 1.5"):
        topk_similarity(q, g, 2, query_chunk_size=1.5)
    with pytest.raises(ValueError, match=r"same width for the dot product, got \(4, 8\) and \(6, 5\)"):
        topk_similarity(q, unit(6, 5, 2), 2)
    with pytest.raises(ValueError, match=r"gallery must be a tensor of shape \(n, D\), got shape \(6,\)"):
        topk_similarity(q, torch.ones(6), 2)
    with pytest.raises(ValueError, match=r"text_image_index must have shape \(6,\) \(one image per text\), got \(5,\)"):
        chunked_retrieval_metrics(q, g, [0, 1, 2, 3, 0])
    with pytest.raises(ValueError, match=r"text_image_index values must lie in \[0, 4\), got \[0, 4\]"):
        chunked_retrieval_metrics(q, g, [0, 1, 2, 3, 4, 0])
    with pytest.raises(ValueError, match=r"ks must be positive ints, got \[5, -1\]"):
        chunked_retrieval_metrics(q, g, [0, 1, 2, 3, 0, 1], ks=(5, -1))
    with pytest.raises(ValueError, match=r"retrieval needs at least one image and one text, got 0 images and 6 texts"):
        chunked_retrieval_metrics(q[:0], g, [0] * 6)
    nan_images = q.clone()
    nan_images[2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN scores in 1 image row\(s\), e.g. rows \[2\]"):
        chunked_retrieval_metrics(nan_images, g, [0, 1, 2, 3, 0, 1], chunk_size=4, query_chunk_size=3)
