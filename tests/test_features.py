"""The feature cache: one encoder pass, several layers, fingerprinted reuse, the model's view and the collator."""

import os

import datasets
import numpy as np
import pytest
import torch

from hf_align import AlignerModel, FeatureCollator, extract_features, features_for
from hf_align.features import features_from_tensors, layer_column, split_by_image
from hf_align.testing import digits_dataset, make_paired_task


@pytest.fixture(scope="module")
def model(tiny_vit, minilm):
    return AlignerModel.from_encoders(tiny_vit, minilm, vision_layer="auto", text_layer=-1, projection_dim=8)


@pytest.fixture(scope="module")
def data():
    base = digits_dataset(12)
    # several captions per image, as in COCO
    return base.map(lambda r: {"caption": [r["caption"], "a photo of " + r["caption"].split()[-1]]})


def _count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


def test_second_extraction_reuses_the_cache_without_running_encoders(model, data, tmp_path):
    vision_calls, h1 = _count_calls(model.vision_model)
    text_calls, h2 = _count_calls(model.text_model)
    try:
        first = extract_features(model, model.processor, data, keep_columns=["label"], batch_size=5, cache_dir=tmp_path)
        n_vision, n_text = len(vision_calls), len(text_calls)
        assert n_vision >= 3 and n_text >= 3  # 12 images in batches of 5
        second = extract_features(
            model, model.processor, data, keep_columns=["label"], batch_size=5, cache_dir=tmp_path
        )
        assert (len(vision_calls), len(text_calls)) == (n_vision, n_text)
    finally:
        h1.remove()
        h2.remove()
    assert second.column_names == first.column_names
    np.testing.assert_array_equal(np.asarray(second["vision_layer_2"]), np.asarray(first["vision_layer_2"]))
    assert [d for d in os.listdir(tmp_path) if ".tmp" in d] == []  # no half-written folder left behind
    # a different layer request is a different cache; what the text tap reads is stored whatever the layers
    third = extract_features(model, model.processor, data, vision_layers=[0], text_layers=[0], cache_dir=tmp_path)
    assert set(third.column_names) == {"vision_layer_0", "text_layer_0", "text_sentence_embedding", "image_id"}
    assert len(os.listdir(tmp_path)) == 2


def test_cache_layout_and_values_match_the_encoders(model, data, tmp_path):
    features = extract_features(model, model.processor, data, keep_columns=["label"], cache_dir=tmp_path)
    # 'auto' stores every vision layer; text stores the last hidden state and what the text tap reads, MiniLM's own
    # sentence-transformers embedding; two captions per image -> two rows per image
    assert features.column_names == [
        "vision_layer_0",
        "vision_layer_1",
        "vision_layer_2",
        "text_layer_6",
        "text_sentence_embedding",
        "image_id",
        "label",
    ]
    assert len(features) == 24
    assert features["image_id"][:4] == [0, 0, 1, 1] and features["label"][:2] == [data[0]["label"]] * 2
    inputs = model.processor(images=[data[1]["image"]], text=[data[1]["caption"][1]])
    states = model.vision_model(pixel_values=inputs["pixel_values"], output_hidden_states=True).hidden_states
    torch.testing.assert_close(torch.tensor(features[3]["vision_layer_1"]), states[1][0, 0], rtol=1e-4, atol=1e-5)
    text_states = model.text_model(input_ids=inputs["input_ids"], output_hidden_states=True).hidden_states
    # hidden states pool as the pipeline does (mean); its embedding is that mean of the final output, normalised
    torch.testing.assert_close(
        torch.tensor(features[3]["text_layer_6"]), text_states[6][0].mean(0), rtol=1e-4, atol=1e-5
    )
    final = model.text_model(input_ids=inputs["input_ids"]).last_hidden_state[0].mean(0)
    torch.testing.assert_close(
        torch.tensor(features[3]["text_sentence_embedding"]), final / final.norm(), rtol=1e-4, atol=1e-5
    )


def test_features_for_and_collator_feed_forward(tiny_vit, minilm, data, tmp_path):
    model = AlignerModel.from_encoders(tiny_vit, minilm, vision_layer=1, projection_dim=8)
    features = extract_features(model, model.processor, data, vision_layers="all", cache_dir=tmp_path)
    view = features_for(model, features)
    assert view.column_names == ["vision_features", "text_features", "image_id"]
    batch = FeatureCollator()([view[i] for i in range(4)])
    assert batch["return_loss"] is True and batch["vision_features"].shape == (4, 32)
    assert torch.isfinite(model(**batch).loss)
    inputs = model.processor(images=[data[0]["image"]], text=[data[0]["caption"][0]])
    torch.testing.assert_close(
        model.get_image_features(vision_features=batch["vision_features"][:1]),
        model.get_image_features(**inputs),
        rtol=1e-4,
        atol=1e-5,
    )


def test_token_columns_keep_variable_length_text_and_collate_with_masks():
    task = make_paired_task(6, tokens=True, n_patches=4, max_text_tokens=5, seed=1)
    features = task.to_features()
    lengths = task.text_mask.sum(1).tolist()
    stored = [np.asarray(row).shape[0] for row in features[layer_column("text", 2, tokens=True)]]
    assert stored == lengths  # padding is not stored
    assert features.features[layer_column("vision", 2, tokens=True)].dtype == "float16"
    rows = [
        {
            "vision_features": features[i][layer_column("vision", 2, True)],
            "text_features": features[i][layer_column("text", 2, True)],
        }
        for i in range(3)
    ]
    batch = FeatureCollator()(rows)
    assert batch["text_features"].shape == (3, max(lengths[:3]), 48)
    assert batch["text_mask"].sum(1).tolist() == lengths[:3]
    torch.testing.assert_close(
        batch["text_features"][0, : lengths[0]], task.text_tokens[2][0, : lengths[0]].half().float()
    )


def test_features_from_tensors_checks_shapes():
    with pytest.raises(
        ValueError, match=r"mismatched sample counts between feature sets: \{'vision layer 0': 3, 'text layer 0': 4\}"
    ):
        features_from_tensors({0: torch.zeros(3, 2)}, {0: torch.zeros(4, 2)})


# ------------------------------------------------------------------------------------------ bad input
def test_missing_columns_and_empty_dataset_are_named(model, data, tmp_path):
    with pytest.raises(
        ValueError, match=r"image_column='img' is not a column of the dataset; columns: \['image', 'label', 'caption'\]"
    ):
        extract_features(model, model.processor, data, image_column="img", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"text_column='text' is not a column"):
        extract_features(model, model.processor, data, text_column="text", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="dataset is empty"):
        extract_features(model, model.processor, data.select([]), cache_dir=tmp_path)
    with pytest.raises(TypeError, match="dataset must be a datasets.Dataset, got list"):
        extract_features(model, model.processor, [1, 2], cache_dir=tmp_path)


def test_a_cache_without_the_model_layer_says_which_layers_it_has(tiny_vit, minilm, data, tmp_path):
    model = AlignerModel.from_encoders(tiny_vit, minilm, vision_layer=0, projection_dim=8)
    features = extract_features(model, model.processor, data, cache_dir=tmp_path)
    model.set_layers(vision_layer=2)
    with pytest.raises(
        ValueError, match=r"no pooled vision features for vision_layer=2 .* pooled vision layers cached: \[0\]"
    ):
        features_for(model, features)


def test_collator_explains_raw_cache_rows():
    rows = [{"vision_layer_0": [0.0], "text_layer_0": [0.0]}]
    with pytest.raises(
        ValueError, match=r"needs a `vision_features` column, got .* hf_align.features_for\(model, features\)"
    ):
        FeatureCollator()(rows)


def test_a_dataset_of_hub_format_loads_into_extraction(model, tmp_path):
    data = datasets.Dataset.from_dict({"image": [digits_dataset(1)[0]["image"]], "caption": ["a digit"]})
    features = extract_features(model, model.processor, data, cache_dir=tmp_path)
    assert len(features) == 1 and features["image_id"] == [0]


def test_split_by_image_holds_out_whole_images_and_checks_its_minimums():
    task = make_paired_task(n=60, seed=0)
    cache = features_from_tensors(task.vision, task.text, image_id=torch.arange(60) // 3)  # 20 images, 3 rows each
    ids = np.asarray(cache["image_id"])
    kept, held_out = split_by_image(cache, 0.25, seed=4)
    assert set(ids[kept].tolist()).isdisjoint(ids[held_out].tolist())
    assert len(held_out) == 15 and len(kept) == 45  # 5 of 20 images, with their 3 rows each
    assert sorted(kept.tolist() + held_out.tolist()) == list(range(60))
    # the held-out images are the first 5 of numpy's default_rng(4) permutation of the image ids
    drawn = np.random.default_rng(4).permutation(np.arange(20))[:5]
    assert sorted(set(ids[held_out].tolist())) == sorted(drawn.tolist())
    np.testing.assert_array_equal(split_by_image(cache, 5, seed=4)[1], held_out)  # a count, the same images
    assert split_by_image(cache, 0.25, seed=5)[1].tolist() != held_out.tolist()
    # without image_id every row is its own image; a zero share with no minimum holds out nothing
    assert [len(part) for part in split_by_image(cache.remove_columns("image_id"), 6)] == [54, 6]
    kept_all, none = split_by_image(cache, 0.0, min_held_out=0)
    assert kept_all.tolist() == list(range(60)) and none.tolist() == []
    with pytest.raises(
        ValueError, match=r"n_test=1 gives 1 held-out images of the 20 in the cache; need at least 2 held"
    ):
        split_by_image(cache, 1, min_held_out=2, name="n_test")
    with pytest.raises(ValueError, match=r"held_out=0.99 gives 20 held-out images of the 20 .* and 1 kept"):
        split_by_image(cache, 0.99)
    for bad in (1.5, -2, True, "3"):
        with pytest.raises(ValueError, match=r"test_fraction must be an image count \(int >= 0\) or a share"):
            split_by_image(cache, bad, name="test_fraction")
