"""`BatchSource` with token caches in memory: its batches equal the Arrow path's tensor for tensor, the automatic
choice follows the memory budget, and bad rows are refused at load. CPU."""

import numpy as np
import pytest
import torch

from hf_align import AlignerModel
from hf_align.features import features_for, features_from_tensors
from hf_align.testing import make_paired_task
from hf_align.training import batches
from hf_align.training.batches import BatchSource


@pytest.fixture(scope="module")
def token_view():
    task = make_paired_task(n=300, vision_dim=12, text_dim=10, tokens=True, n_patches=5, max_text_tokens=7, seed=0)
    model = AlignerModel.from_feature_dims(12, 10, method="token_relative", num_anchors=4)
    model.config.vision_layer = model.config.text_layer = 2
    view = features_for(model, task.to_features())
    # a shuffled subset: an index mapping over the Arrow table, as validation splits and `select` make
    return view.select(np.random.default_rng(0).permutation(len(view))[:250])


def test_preloaded_token_batches_equal_the_arrow_path(token_view):
    arrow = BatchSource(token_view, preload_tokens=False)
    memory = BatchSource(token_view, preload_tokens=True)
    assert not arrow.preloaded and memory.preloaded
    assert memory.vision.dtype == torch.float16 and memory.vision.shape == (250, 5, 12)
    assert memory.text.shape == (250, 7, 10)
    generator = torch.Generator().manual_seed(1)
    for size in (1, 7, 64, 250):
        rows = torch.randperm(250, generator=generator)[:size]
        expected, got = arrow.fetch(rows, with_image_ids=True), memory.fetch(rows, with_image_ids=True)
        assert sorted(expected) == sorted(got)
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == got[key].dtype and torch.equal(value, got[key]), key
            else:
                assert value == got[key]
    # a batch of short captions only is cut to its own longest one, as the collator pads
    short = torch.nonzero(memory.text_lengths <= 3).flatten()[:5]
    assert memory.fetch(short)["text_features"].shape[1] == int(memory.text_lengths[short].max()) <= 3


def test_preload_is_automatic_when_the_tokens_fit(token_view, monkeypatch):
    assert BatchSource(token_view).preloaded
    # 250 rows x (5 x 12 + 7 x 10) fp16 values = 65,000 bytes: a quarter of 260,000 bytes holds them, of 259,996 not
    monkeypatch.setattr(batches, "_available_memory", lambda: 260_000)
    assert BatchSource(token_view).preloaded
    monkeypatch.setattr(batches, "_available_memory", lambda: 259_996)
    assert not BatchSource(token_view).preloaded


def test_non_finite_token_rows_are_refused_at_load():
    tokens = torch.randn(6, 4, 3)
    tokens[4, 2, 1] = float("nan")
    cache = features_from_tensors(
        {0: torch.randn(6, 3)},
        {0: torch.randn(6, 3)},
        vision_tokens={0: tokens},
        text_tokens={0: torch.randn(6, 2, 3)},
        text_mask=torch.ones(6, 2, dtype=torch.bool),
    )
    view = features_for(AlignerModel.from_feature_dims(3, 3, method="token_relative", num_anchors=2), cache)
    with pytest.raises(ValueError, match=r"NaN or Inf in vision_features of 1 row\(s\), e.g. rows \[4\]"):
        BatchSource(view, preload_tokens=True)
    lazy = BatchSource(view, preload_tokens=False)  # the Arrow path finds it when the batch holding it is read
    with pytest.raises(ValueError, match=r"rows \[4\]"):
        lazy.fetch(torch.tensor([3, 4]))


def test_token_rows_without_a_token_are_refused_at_load():
    # caption 2 has no real token: token methods would pool over nothing (NaN) and train() skips the model's own
    # per-forward check of this, so the cache is checked once when it is loaded (or as a batch is read)
    mask = torch.ones(6, 2, dtype=torch.bool)
    mask[2] = False
    cache = features_from_tensors(
        {0: torch.randn(6, 3)},
        {0: torch.randn(6, 3)},
        vision_tokens={0: torch.randn(6, 4, 3)},
        text_tokens={0: torch.randn(6, 2, 3)},
        text_mask=mask,
    )
    view = features_for(AlignerModel.from_feature_dims(3, 3, method="token_relative", num_anchors=2), cache)
    with pytest.raises(ValueError, match=r"1 row\(s\) with no token in text_features, e.g. rows \[2\]"):
        BatchSource(view, preload_tokens=True)
    lazy = BatchSource(view, preload_tokens=False)
    lazy.fetch(torch.tensor([0, 1, 3]))  # batches without it are read
    with pytest.raises(ValueError, match=r"no token in text_features, e.g. rows \[2\]"):
        lazy.fetch(torch.tensor([1, 2]))
