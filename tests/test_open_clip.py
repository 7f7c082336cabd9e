"""open_clip's interface on an aligner: encode_image / encode_text, (model, preprocess, tokenizer), and clip_benchmark's
metric code run on it, scoring exactly what `evaluate_zero_shot` / `evaluate_retrieval` score on the same data.

clip_benchmark is installed with `--no-deps` (its declared dependencies pull open_clip and torchvision builds; its
metric modules need neither)."""

import datasets
import pytest
import torch
import torch.nn.functional as F
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score
from torch.utils.data import DataLoader

from hf_align import AlignerModel, evaluate_retrieval, evaluate_zero_shot
from hf_align.evaluation.zero_shot_retrieval import embed_images
from hf_align.integrations.open_clip import (
    AlignerTokenizer,
    ClassificationDataset,
    RetrievalDataset,
    collate_image_captions,
    create_model_and_transforms,
    get_tokenizer,
)
from hf_align.model.templates import class_prototypes
from hf_align.testing import DIGIT_NAMES, digits_dataset

TEMPLATES = ["a handwritten digit {}.", "a photo of the number {}."]
# 64 images: top-k over 64 samples is a multiple of 1/64, exact in float32 (ours) and float64 (scikit-learn) alike.
N_IMAGES = 64


@pytest.fixture(scope="module")
def aligner_dir(tiny_vit, minilm, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("open_clip") / "aligner")
    torch.manual_seed(0)
    AlignerModel.from_encoders(tiny_vit, minilm, projection_dim=8).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(aligner_dir):
    return create_model_and_transforms(aligner_dir, device="cpu")


@pytest.fixture(scope="module")
def digits():
    return digits_dataset(N_IMAGES)


@torch.no_grad()
def test_encode_image_and_encode_text_are_the_aligner_outputs(loaded, digits):
    model, _, tokenizer = loaded
    pixel_values = model.processor.image_processor(digits[:4]["image"], return_tensors="pt")["pixel_values"]
    raw = model.encode_image(pixel_values)
    assert raw.shape == (4, model.aligner.embed_dim)
    # the aligner's own output, before the normalisation get_image_features applies
    features, mask = model.tapped_vision_features(pixel_values)
    assert features.shape == (4, model.config.vision_hidden_size) and mask is None
    assert torch.equal(raw, model.aligner.embed_image(features, None))
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(4))
    assert torch.equal(model.encode_image(pixel_values, normalize=True), model.get_image_features(pixel_values))
    assert torch.equal(model.encode_image(pixel_values, normalize=True), F.normalize(raw, dim=-1))

    captions = ["a handwritten digit three", "seven", "the number zero drawn by hand"]
    tokens = tokenizer(captions)
    assert set(tokens) == {"input_ids", "attention_mask", "token_type_ids"}  # MiniLM's BERT tokenizer makes all three
    expected = model.get_text_features(**model.processor.tokenizer(captions, padding=True, return_tensors="pt"))
    assert torch.equal(model.encode_text(tokens, normalize=True), expected)
    assert torch.equal(model.encode_text(dict(tokens), normalize=True), expected)
    text_features, _ = model.tapped_text_features(**tokens)
    assert torch.equal(model.encode_text(tokens), model.aligner.embed_text(text_features, None))
    # a bare (B, T) id tensor is read as unpadded: right for one text, whose tokens are all real
    one = tokenizer(["seven"])
    assert torch.equal(model.encode_text(one["input_ids"]), model.encode_text(one))


def test_encode_text_rejects_what_is_not_tokens(loaded):
    model, _, tokenizer = loaded
    with pytest.raises(TypeError, match=r"`tokens` must be a \(B, T\) tensor of input ids or a mapping .* got list"):
        model.encode_text(["a cat"])
    with pytest.raises(ValueError, match=r"must hold `input_ids` .*got keys \['attention_mask', 'input_ids', 'pix"):
        model.encode_text({**tokenizer(["a cat"]), "pixel_values": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"must hold `input_ids` .*got keys \['attention_mask'\]"):
        model.encode_text({"attention_mask": torch.ones(1, 3)})
    with pytest.raises(ValueError, match=r"`input_ids` must be a \(B, T\) tensor, got \(3,\)"):
        model.encode_text(torch.tensor([101, 2000, 102]))
    # the pre-open_clip call encode_text(input_ids, attention_mask) is pointed at its new name
    tokens = tokenizer(["a cat"])
    with pytest.raises(TypeError, match=r"normalize must be a bool, got Tensor; .* are tapped_text_features\(\.\.\.\)"):
        model.encode_text(tokens["input_ids"], tokens["attention_mask"])


def test_preprocess_and_tokenizer_are_the_aligners_processor(loaded, aligner_dir, digits):
    model, preprocess, tokenizer = loaded
    assert not model.training
    images = digits[:3]["image"]
    batch = model.processor.image_processor(images, return_tensors="pt")["pixel_values"]
    assert torch.equal(torch.stack([preprocess(image) for image in images]), batch)
    assert preprocess(images[0]).shape == batch.shape[1:]
    with pytest.raises(TypeError, match="preprocess transforms one image, got a list of 3"):
        preprocess(images)

    texts = ["a cat", "a handwritten digit three on white paper"]
    tokens = tokenizer(texts)
    reference = model.processor.tokenizer(texts, padding=True, return_tensors="pt")
    assert all(torch.equal(tokens[key], reference[key]) for key in reference)
    assert torch.equal(tokenizer("a cat")["input_ids"], tokenizer(["a cat"])["input_ids"])
    # truncation at context_length, per call or per tokenizer
    assert tokenizer(texts, context_length=4)["input_ids"].shape == (2, 4)
    assert AlignerTokenizer(model.processor.tokenizer, context_length=5)(texts)["input_ids"].shape == (2, 5)
    assert torch.equal(get_tokenizer(aligner_dir)(texts)["input_ids"], tokens["input_ids"])
    with pytest.raises(TypeError, match=r"`texts` must be a str or a non-empty list of str, got a list of \['int'"):
        tokenizer(["a cat", 3])
    with pytest.raises(TypeError, match="got an empty list"):
        tokenizer([])


def test_an_aligner_without_processor_files_is_refused(tiny_vit, minilm, tmp_path):
    model = AlignerModel.from_encoders(tiny_vit, minilm, projection_dim=8)
    model.processor = None
    model.save_pretrained(str(tmp_path / "bare"))
    with pytest.raises(ValueError, match=r"has no processor files .* to build preprocess and tokenizer"):
        create_model_and_transforms(str(tmp_path / "bare"))


def test_torch_datasets_refuse_missing_columns(digits, loaded):
    _, preprocess, _ = loaded
    with pytest.raises(ValueError, match=r"label_column='cls' is not a column of the dataset: \['image', 'label'"):
        ClassificationDataset(digits, preprocess, label_column="cls")
    with pytest.raises(ValueError, match=r"classes not given and column 'label' is not a ClassLabel .*\(it is Value\)"):
        ClassificationDataset(digits.cast_column("label", datasets.Value("int64")), preprocess)
    with pytest.raises(ValueError, match=r"text_column='text' is not a column"):
        RetrievalDataset(digits, preprocess, text_column="text")


def test_clip_benchmark_zero_shot_classification_equals_evaluate_zero_shot(loaded, digits):
    model, preprocess, tokenizer = loaded
    loader = DataLoader(ClassificationDataset(digits, preprocess), batch_size=16)
    assert loader.dataset.classes == DIGIT_NAMES
    # clip_benchmark's own classifier and logits. Its `evaluate` then scores them with its `accuracy` helper, which
    # fails under NumPy 2 (`float()` of a one-element array), so the scores are taken from the logits here: top-k by
    # scikit-learn, mean per-class recall by the scikit-learn function clip_benchmark's `evaluate` calls.
    # amp=False: on CPU, clip_benchmark's default autocast would run the encoders in bfloat16.
    theirs_templates = [t.replace("{}", "{c}") for t in TEMPLATES]  # clip_benchmark's placeholder is {c}
    classifier = zeroshot_classification.zero_shot_classifier(
        model, tokenizer, loader.dataset.classes, theirs_templates, "cpu", amp=False
    )
    logits, target = zeroshot_classification.run_classification(model, classifier, loader, "cpu", amp=False)
    ours = evaluate_zero_shot(model, model.processor, digits, DIGIT_NAMES, TEMPLATES, batch_size=16)

    # the same class embeddings (clip_benchmark's (D, C) classifier is hf_align's (C, D) prototypes) and logits
    prototypes = class_prototypes(model, model.processor, DIGIT_NAMES, TEMPLATES)
    torch.testing.assert_close(classifier.t(), prototypes)
    image_embeds = embed_images(model, model.processor, digits[:]["image"])
    torch.testing.assert_close(logits / 100.0, image_embeds @ prototypes.t())  # cosines: float32 tolerances apply
    assert torch.equal(target, torch.tensor(digits["label"]))
    labels = list(range(len(DIGIT_NAMES)))
    assert ours["top1"] == 100.0 * top_k_accuracy_score(target, logits, k=1, labels=labels)
    assert ours["top5"] == 100.0 * top_k_accuracy_score(target, logits, k=5, labels=labels)
    assert 0 < ours["top5"] < 100
    # per-class recalls over 3 to 10 images are not exact binary fractions: float32 (ours) and float64 (theirs)
    # round them apart in the 7th digit, while one image more or less would move the mean by over 1 point.
    assert ours["mean_per_class_recall"] == pytest.approx(
        100.0 * balanced_accuracy_score(target, logits.argmax(1)), rel=1e-6
    )


def test_clip_benchmark_zero_shot_retrieval_equals_evaluate_retrieval(loaded, digits):
    model, preprocess, tokenizer = loaded
    # unique captions (two for every other image): identical captions would tie, and the two protocols break ties
    # differently (clip_benchmark by topk order, hf_align against the query)
    captions = [
        [f"a handwritten {DIGIT_NAMES[label]}, image {i}", f"the digit {DIGIT_NAMES[label]} by hand, number {i}"]
        if i % 2 == 0
        else [f"scan {i} of a written {DIGIT_NAMES[label]}"]
        for i, label in enumerate(digits["label"])
    ]
    data = digits.remove_columns("caption").add_column("caption", captions)
    loader = DataLoader(RetrievalDataset(data, preprocess), batch_size=16, collate_fn=collate_image_captions)
    images, texts = next(iter(loader))
    assert images.shape == (16, 3, 32, 32) and texts[0] == captions[0] and texts[1] == captions[1]

    theirs = zeroshot_retrieval.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    ours = evaluate_retrieval(model, model.processor, data, batch_size=16)
    for k in (1, 5, 10):
        # clip_benchmark's "image retrieval" is text -> image; its "text retrieval" is image -> text
        assert ours[f"text_to_image_R@{k}"] == 100.0 * theirs[f"image_retrieval_recall@{k}"]
        assert ours[f"image_to_text_R@{k}"] == 100.0 * theirs[f"text_retrieval_recall@{k}"]
    assert 0 < ours["mean_R@10"] < 100
