"""A sentence-transformers repo's own pipeline (Pooling, Dense, Normalize), checked against sentence-transformers."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer, models
from transformers import AutoModel, AutoTokenizer

from hf_align.encoders import EncoderLoadError, load_encoder, probe_text
from hf_align.encoders.loading import text_taps
from hf_align.encoders.sentence_pipeline import SentenceEncoder, read_sentence_pipeline
from hf_align.encoders.taps import Tap, resolve_tap
from hf_align.model.processing import AlignerProcessor, prepare_tokenizer
from hf_align.testing import minilm_path, save_tiny_text_encoder, save_tiny_vision_encoder

TEXTS = ["a cat", "a photo of a big brown dog on the grass", "two birds on a wire"]
SENTENCE = Tap(-1, "sentence_embedding", "none")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("st")
    return {kind: save_tiny_text_encoder(str(root / kind), kind=kind) for kind in ("bert", "qwen3")}


def _ours(path: str, side: str | None = None, texts=TEXTS) -> torch.Tensor:
    encoder = load_encoder("text", path, source="auto")
    tap = resolve_tap(probe_text(encoder, path), "text")
    assert tap == SENTENCE
    tokenizer = AutoTokenizer.from_pretrained(path)
    prepare_tokenizer(tokenizer)
    if side is not None:
        tokenizer.padding_side = side
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return text_taps(encoder, batch["input_ids"], batch["attention_mask"], [tap], batch.get("token_type_ids"))[0][0]


def _reference(path: str, texts=TEXTS) -> torch.Tensor:
    return SentenceTransformer(path, device="cpu").encode(texts, convert_to_tensor=True)


def test_minilm_pipeline_equals_sentence_transformers():
    path = minilm_path()
    pipeline = read_sentence_pipeline(path)
    assert pipeline.pooling_modes == ("mean",) and pipeline.steps == ({"type": "Normalize"},)
    assert pipeline.max_seq_length == 256
    expected = _reference(path)
    for side in ("right", "left"):
        torch.testing.assert_close(_ours(path, side), expected, rtol=0, atol=1e-5)
    assert torch.linalg.norm(expected, dim=-1).sub(1).abs().max() < 1e-5  # its Normalize ran


def _st_folder(root, base: str, pooling, dense: bool, normalize: bool, name: str) -> str:
    modules = [models.Transformer(base)]
    modules.append(models.Pooling(modules[0].get_embedding_dimension(), pooling_mode=pooling))
    if dense:
        modules.append(models.Dense(modules[1].get_embedding_dimension(), 16, activation_function=torch.nn.Tanh()))
    if normalize:
        modules.append(models.Normalize())
    torch.manual_seed(0)
    path = str(root / name)
    SentenceTransformer(modules=modules, device="cpu").save(path)
    return path


@pytest.mark.parametrize(
    "pooling", ["cls", "max", "weightedmean", "lasttoken", "mean_sqrt_len_tokens", ("mean", "cls")], ids=str
)
def test_dense_and_normalize_as_configured(tiny, tmp_path, pooling):
    path = _st_folder(tmp_path, tiny["bert"], pooling, dense=True, normalize=True, name="st")
    assert os.listdir(os.path.join(path, "2_Dense")) and load_file(os.path.join(path, "2_Dense", "model.safetensors"))
    expected = _reference(path)
    assert expected.shape == (3, 16)
    torch.testing.assert_close(_ours(path), expected, rtol=0, atol=1e-5)
    # Written back by hf_align (bundling): sentence-transformers and hf_align read the same embedding from it.
    encoder = load_encoder("text", path, source="auto")
    encoder.save_pretrained(tmp_path / "ours")
    AutoTokenizer.from_pretrained(path).save_pretrained(tmp_path / "ours")
    torch.testing.assert_close(_reference(str(tmp_path / "ours")), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(_ours(str(tmp_path / "ours")), expected, rtol=0, atol=1e-5)


def test_cls_pooling_config_gives_the_cls_vector_of_last_hidden_state(tiny, tmp_path):
    path = _st_folder(tmp_path, tiny["bert"], "cls", dense=False, normalize=False, name="cls")
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        final = AutoModel.from_pretrained(path)(**batch).last_hidden_state
    torch.testing.assert_close(_ours(path), final[:, 0], rtol=0, atol=1e-6)


def test_decoder_last_token_pipeline_with_left_padding_equals_sentence_transformers(tiny, tmp_path):
    # Qwen3-Embedding style: last-token pooling, a tokenizer padding on the left, Normalize.
    path = _st_folder(tmp_path, tiny["qwen3"], "lasttoken", dense=False, normalize=True, name="qwen")
    tokenizer = AutoTokenizer.from_pretrained(path)
    prepare_tokenizer(tokenizer)
    tokenizer.save_pretrained(path)  # sentence-transformers pads with it too
    assert tokenizer.padding_side == "left"
    torch.testing.assert_close(_ours(path), _reference(path), rtol=0, atol=1e-5)


def test_a_plain_repo_has_no_sentence_embedding(tiny):
    assert read_sentence_pipeline(tiny["bert"]) is None
    assert not isinstance(load_encoder("text", tiny["bert"], source="auto"), SentenceEncoder)
    with pytest.raises(EncoderLoadError, match=r"has no sentence-transformers pipeline \(no modules.json\)"):
        load_encoder("text", tiny["bert"], source="sentence_embedding")
    # Aligners saved before taps reload the plain model, pipeline or not.
    assert not isinstance(load_encoder("text", minilm_path()), SentenceEncoder)


def _edit_json(path: str, edit) -> None:
    with open(path) as handle:
        value = json.load(handle)
    edit(value)
    with open(path, "w") as handle:
        json.dump(value, handle)


def test_pickle_only_dense_weights_are_refused(tiny, tmp_path):
    path = _st_folder(tmp_path, tiny["bert"], "mean", dense=True, normalize=False, name="pickle")
    weights = os.path.join(path, "2_Dense", "model.safetensors")
    torch.save(load_file(weights), os.path.join(path, "2_Dense", "pytorch_model.bin"))
    os.remove(weights)
    with pytest.raises(EncoderLoadError, match=r"has no model.safetensors weights \(found only a pickle checkpoint"):
        load_encoder("text", path, source="auto")


def test_activations_outside_torch_nn_are_refused(tiny, tmp_path):
    path = _st_folder(tmp_path, tiny["bert"], "mean", dense=True, normalize=False, name="act")
    config = os.path.join(path, "2_Dense", "config.json")
    _edit_json(config, lambda c: c.update(activation_function="os.system"))
    with pytest.raises(EncoderLoadError, match=r"activation_function='os.system'; hf_align runs only the torch.nn"):
        load_encoder("text", path, source="auto")
    _edit_json(config, lambda c: c.update(activation_function="torch.nn.modules.activation.GELU"))
    assert isinstance(load_encoder("text", path, source="auto").steps[0].activation, torch.nn.GELU)


def test_modules_hf_align_cannot_run_are_refused_by_name(tiny, tmp_path):
    path = _st_folder(tmp_path, tiny["bert"], "mean", dense=False, normalize=False, name="extra")
    extra = {"idx": 2, "name": "2", "path": "2_LayerNorm", "type": "sentence_transformers.models.LayerNorm"}
    _edit_json(os.path.join(path, "modules.json"), lambda modules: modules.append(extra))
    with pytest.raises(EncoderLoadError, match=r"lists sentence-transformers modules \['LayerNorm'\] that hf_align"):
        load_encoder("text", path, source="auto")
    # The plain model and its tokenizer still load for the other sources.
    assert load_encoder("text", path, source="last_hidden_state").config.model_type == "bert"
    processor = AlignerProcessor.from_encoders(save_tiny_vision_encoder(str(tmp_path / "vit")), path)
    assert processor.tokenizer.model_max_length == 128  # the tokenizer's own limit: no pipeline was read


def test_processor_truncates_at_the_repos_max_seq_length(tmp_path):
    processor = AlignerProcessor.from_encoders(save_tiny_vision_encoder(str(tmp_path / "vit")), minilm_path())
    assert AutoTokenizer.from_pretrained(minilm_path()).model_max_length == 512
    assert processor.tokenizer.model_max_length == 256
    assert processor(text=[" ".join(["word"] * 400)])["input_ids"].shape == (1, 256)


def test_a_pipeline_bundled_in_a_subfolder_loads_back(tiny, tmp_path):
    # What an aligner saved with bundle_encoders=True holds: the encoder's folder under text_encoder/.
    path = _st_folder(tmp_path, tiny["bert"], "cls", dense=True, normalize=True, name="st")
    load_encoder("text", path, source="auto").save_pretrained(tmp_path / "aligner" / "text_encoder")
    AutoTokenizer.from_pretrained(path).save_pretrained(tmp_path / "aligner" / "text_encoder")
    bundled = load_encoder(
        "text", str(tmp_path / "aligner"), source="auto", subfolder="text_encoder", use_safetensors=True
    )
    assert isinstance(bundled, SentenceEncoder) and bundled.pipeline.steps[0]["path"] == "text_encoder/2_Dense"
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        [(features, _)] = text_taps(bundled, batch["input_ids"], batch["attention_mask"], [SENTENCE])
    torch.testing.assert_close(features, _reference(path), rtol=0, atol=1e-5)
