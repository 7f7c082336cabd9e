"""LoRA on the encoders: block resolution, end-to-end training on raw inputs, save/load as PEFT adapters beside the
aligner, bundling. Tiny random encoders: a 2-block ViT (`layers.N.attention.q_proj`) and a 2-block BERT
(`encoder.layer.N.attention.self.query`)."""

import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors import safe_open
from sentence_transformers import SentenceTransformer, models
from transformers import AutoModel, Trainer, TrainingArguments, pipeline

from hf_align import AlignerModel
from hf_align.encoders.lora import (
    ImageTextCollator,
    base_encoder_state_dict,
    encoder_lora_parameters,
    resolve_lora_config,
)
from hf_align.encoders.sentence_pipeline import SentenceEncoder
from hf_align.encoders.taps import Tap
from hf_align.testing import digits_dataset

BOTH = ["q_proj", "v_proj", "query", "value"]  # attention projections of the ViT and of BERT
CAPTIONS = ["a cat", "a dog on a beach", "a big red car", "two trees"]


@pytest.fixture(scope="module")
def encoders(tiny_vit, tiny_bert):
    """(vision folder, text folder) of the session's tiny encoders."""
    return tiny_vit, tiny_bert


@pytest.fixture(scope="module")
def plain_model(encoders):
    return AlignerModel.from_encoders(*encoders, method="linear", projection_dim=16)


def tensor_names(path):
    with safe_open(path, "pt") as f:
        return set(f.keys())


def assert_base_weights_unchanged(model, encoders):
    for modality, path in zip(("vision", "text"), encoders):
        original = AutoModel.from_pretrained(path).state_dict()
        current = base_encoder_state_dict(getattr(model, f"{modality}_model"))
        assert current.keys() == original.keys()
        for name, tensor in original.items():
            assert torch.equal(current[name], tensor), f"{modality} base weight {name} changed"


def test_lora_aligner_trains_end_to_end_and_round_trips(encoders, random_images, tmp_path):
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=BOTH, layers_to_transform=[-1])
    model = AlignerModel.from_encoders(*encoders, method="linear", projection_dim=16, encoder_lora=config)
    assert isinstance(model.vision_model, PeftModel) and isinstance(model.text_model, PeftModel)
    assert model.config.encoder_lora == ["text", "vision"]
    # -1 = the last block (the tap is the last hidden state), resolved to full module names per encoder.
    assert model.vision_model.peft_config["default"].target_modules == {
        "layers.1.attention.q_proj",
        "layers.1.attention.v_proj",
    }
    assert model.text_model.peft_config["default"].target_modules == {
        "encoder.layer.1.attention.self.query",
        "encoder.layer.1.attention.self.value",
    }
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(name.startswith("aligner.") or ".lora_" in name for name in trainable)
    assert sum(".lora_" in name for name in trainable) == 8  # A and B of 2 layers in 2 encoders

    inputs = model.processor(images=random_images, text=CAPTIONS)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(**inputs, return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0]
    lora_b = [p for name, p in model.named_parameters() if ".lora_B." in name]
    assert len(lora_b) == 4 and all(p.abs().max() > 0 for p in lora_b)  # B starts at zero: gradients reached both
    assert_base_weights_unchanged(model, encoders)

    with torch.no_grad():
        image_embeds = model.get_image_features(**model.processor(images=random_images))
        text_embeds = model.get_text_features(**model.processor(text=CAPTIONS))
    model.save_pretrained(tmp_path)
    assert not any(
        n.startswith(("vision_model.", "text_model.")) or "lora" in n
        for n in tensor_names(tmp_path / "model.safetensors")
    )
    vision_adapter = tmp_path / "vision_encoder_lora"
    assert sorted(os.listdir(vision_adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert tensor_names(vision_adapter / "adapter_model.safetensors") == {
        f"base_model.model.layers.1.attention.{proj}.lora_{ab}.weight" for proj in ("q_proj", "v_proj") for ab in "AB"
    }
    adapter_config = json.loads((vision_adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == os.path.abspath(encoders[0])
    assert adapter_config["inference_mode"] is True and adapter_config["layers_to_transform"] is None
    assert json.loads((tmp_path / "config.json").read_text())["encoder_lora"] == ["text", "vision"]

    loaded = AlignerModel.from_pretrained(tmp_path)
    assert isinstance(loaded.vision_model, PeftModel) and isinstance(loaded.text_model, PeftModel)
    with torch.no_grad():
        assert torch.equal(loaded.get_image_features(**model.processor(images=random_images)), image_embeds)
        assert torch.equal(loaded.get_text_features(**model.processor(text=CAPTIONS)), text_embeds)
    assert len(encoder_lora_parameters(loaded)) == 8
    assert not any(p.requires_grad for p in encoder_lora_parameters(loaded))  # loaded frozen, as PEFT does
    assert_base_weights_unchanged(loaded, encoders)

    # The adapter folder is plain PEFT: it loads onto a fresh encoder and gives the same tapped features (the ViT's
    # own final output, CLS token: what `auto` taps).
    pixel_values = model.processor(images=random_images)["pixel_values"]
    peft_vit = PeftModel.from_pretrained(
        AutoModel.from_pretrained(encoders[0]), str(tmp_path), subfolder="vision_encoder_lora"
    )
    assert loaded.config.tap("vision") == Tap(-1, "last_hidden_state", "cls")
    with torch.no_grad():
        cls_tokens = peft_vit(pixel_values=pixel_values).last_hidden_state[:, 0]
        assert torch.equal(cls_tokens, loaded.tapped_vision_features(pixel_values)[0])

    # The stock transformers pipeline loads the folder with its adapters and scores as the trained model does.
    classifier = pipeline("zero-shot-image-classification", model=str(tmp_path))
    assert isinstance(classifier.model.vision_model, PeftModel)
    result = {r["label"]: r["score"] for r in classifier(random_images[0], candidate_labels=CAPTIONS)}
    with torch.no_grad():
        prompts = [f"This is a photo of {c}." for c in CAPTIONS]  # the pipeline's default hypothesis template
        expected = model(**model.processor(images=random_images[:1], text=prompts)).logits_per_image[0].softmax(-1)
    torch.testing.assert_close(torch.tensor([result[c] for c in CAPTIONS]), expected, atol=1e-6, rtol=0)

    # Bundled: the encoder folders hold base weights only (original names), the adapters sit beside them.
    bundle = tmp_path / "bundle"
    model.save_pretrained(bundle, bundle_encoders=True)
    for subfolder in ("vision_encoder", "text_encoder"):
        names = tensor_names(bundle / subfolder / "model.safetensors")
        assert names and not any("lora" in n or "base_layer" in n for n in names)
    rebuilt = AlignerModel.from_pretrained(bundle)
    with torch.no_grad():
        assert torch.equal(rebuilt.get_image_features(**model.processor(images=random_images)), image_embeds)


def test_lora_dropout_follows_train_mode_inside_frozen_encoders(encoders):
    model = AlignerModel.from_encoders(
        *encoders,
        method="linear",
        projection_dim=16,
        encoder_lora={"vision": LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[-1], lora_dropout=0.1)},
    )
    assert isinstance(model.vision_model, PeftModel) and not isinstance(model.text_model, PeftModel)
    assert model.config.encoder_lora == ["vision"]

    def modes():
        lora_dropout = [m.training for n, m in model.vision_model.named_modules() if n.endswith("lora_dropout.default")]
        encoder_dropout = [m.training for n, m in model.vision_model.named_modules() if n.endswith("layers.1.dropout")]
        return lora_dropout, encoder_dropout

    assert modes() == ([False], [False])
    model.train()
    assert modes() == ([True], [False]) and model.aligner.training
    model.eval()
    assert modes() == ([False], [False])


def test_layers_resolve_relative_to_the_tapped_layer(plain_model):
    vit, bert = plain_model.vision_model, plain_model.text_model
    # Tap hidden state 1 (= after block 0): -1 is block 0, and block 1 can no longer reach the tap.
    config = LoraConfig(target_modules=["q_proj"], layers_to_transform=[-1])
    assert resolve_lora_config(config, vit, "vision", tapped_layer=1, num_hidden_states=3).target_modules == {
        "layers.0.attention.q_proj"
    }
    with pytest.raises(ValueError, match=r"layers_to_transform has 1, but only blocks 0\.\.0 .*hidden state 1"):
        resolve_lora_config(LoraConfig(target_modules=["q_proj"], layers_to_transform=[1]), vit, "vision", 1, 3)
    with pytest.raises(ValueError, match=r"layers_to_transform has -3, but only blocks 0\.\.1"):
        resolve_lora_config(LoraConfig(target_modules=["q_proj"], layers_to_transform=[-3]), vit, "vision", 2, 3)
    # No layers_to_transform: every block up to the tap; target_modules=None: PEFT's default for BERT (query, value).
    assert resolve_lora_config(LoraConfig(), bert, "text", tapped_layer=2, num_hidden_states=3).target_modules == {
        f"encoder.layer.{b}.attention.self.{name}" for b in (0, 1) for name in ("query", "value")
    }
    # A regex is matched against the full module names.
    regex = LoraConfig(target_modules=r".*\.(fc1|fc2)")
    assert resolve_lora_config(regex, vit, "vision", 2, 3).target_modules == {
        f"layers.{b}.mlp.fc{i}" for b in (0, 1) for i in (1, 2)
    }
    with pytest.raises(
        ValueError, match=r"no default for model_type 'vit'.*\['fc1', 'fc2', 'k_proj', 'o_proj', 'q_proj', 'v_proj'\]"
    ):
        resolve_lora_config(LoraConfig(), vit, "vision", 2, 3)
    with pytest.raises(ValueError, match=r"target_modules=\['query'\] matches nothing in blocks \[1\]"):
        resolve_lora_config(LoraConfig(target_modules=["query"], layers_to_transform=[-1]), vit, "vision", 2, 3)
    with pytest.raises(ValueError, match="cannot find the vision encoder's list of 5 blocks"):
        resolve_lora_config(config, vit, "vision", 2, 6)


def test_encoder_lora_argument_errors(encoders, plain_model, tmp_path):
    config = LoraConfig(target_modules=["q_proj"])
    with pytest.raises(TypeError, match="encoder_lora must be a peft.LoraConfig or a dict .* got str"):
        AlignerModel.from_encoders(*encoders, encoder_lora="q_proj")
    with pytest.raises(ValueError, match=r"encoder_lora keys must be 'vision' and/or 'text', got \['audio'\]"):
        AlignerModel.from_encoders(*encoders, encoder_lora={"audio": config})
    with pytest.raises(TypeError, match=r"encoder_lora\['text'\] must be a peft.LoraConfig, got dict"):
        AlignerModel.from_encoders(*encoders, encoder_lora={"text": {"r": 4}})
    with pytest.raises(ValueError, match="needs a LoraConfig for `vision`, `text` or both; got neither"):
        plain_model.add_encoder_lora()
    # A bad text config is found before the vision encoder is wrapped: the model is left as it was.
    with pytest.raises(ValueError, match="matches nothing"):
        plain_model.add_encoder_lora(vision=config, text=config)
    assert not isinstance(plain_model.vision_model, PeftModel) and plain_model.config.encoder_lora == []

    model = AlignerModel.from_encoders(*encoders, method="linear", projection_dim=16, encoder_lora={"vision": config})
    with pytest.raises(ValueError, match="the vision encoder already has a LoRA adapter"):
        model.add_encoder_lora(vision=config)
    model.save_pretrained(tmp_path)
    aligner_only = AlignerModel.from_pretrained(tmp_path, load_encoders=False)
    with pytest.raises(ValueError, match=r"config.encoder_lora lists \['vision'\] but no LoRA adapter is loaded"):
        aligner_only.save_pretrained(tmp_path / "again")
    with pytest.raises(ValueError, match="encoder_lora must be a list of 'vision' and/or 'text', got 'vision'"):
        type(model.config)(encoder_lora="vision")


def test_trainer_trains_lora_end_to_end_on_raw_pairs(encoders, tmp_path):
    torch.manual_seed(0)
    lora = LoraConfig(r=2, target_modules=BOTH, layers_to_transform=[-1])
    model = AlignerModel.from_encoders(*encoders, method="linear", projection_dim=16, encoder_lora=lora)
    head_before = model.aligner.vision_head.weight.detach().clone()
    pairs = digits_dataset(8)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        remove_unused_columns=False,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=pairs, data_collator=ImageTextCollator(model.processor))
    assert trainer.train().global_step == 2
    assert all(p.abs().max() > 0 for name, p in model.named_parameters() if ".lora_B." in name)
    assert not torch.equal(model.aligner.vision_head.weight, head_before)
    assert_base_weights_unchanged(model, encoders)

    collate = ImageTextCollator(model.processor)
    batch = collate([pairs[0], pairs[1]])
    assert batch["return_loss"] is True and batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"].shape == batch["input_ids"].shape
    with pytest.raises(
        ValueError, match=r"text_column='text' is not in the batch rows, which have \['caption', 'image', 'label'\]"
    ):
        ImageTextCollator(model.processor, text_column="text")([pairs[0]])
    with pytest.raises(ValueError, match=r"'caption' must hold one caption string per image, got \['list'\]"):
        collate([{"image": pairs[0]["image"], "caption": ["a", "b"]}])


def test_lora_on_a_sentence_transformers_text_encoder_bundles_and_reloads(encoders, random_images, tmp_path):
    # The text encoder is a sentence-transformers folder read through its pipeline (CLS pooling, Normalize): the
    # adapter goes on the transformers model inside, and a bundle saves that model's base weights beside the pipeline.
    transformer = models.Transformer(encoders[1])
    pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode="cls")
    SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device="cpu").save(str(tmp_path / "st"))
    lora = LoraConfig(r=2, target_modules=["query", "value"], layers_to_transform=[-1])
    model = AlignerModel.from_encoders(encoders[0], str(tmp_path / "st"), projection_dim=8, encoder_lora={"text": lora})
    assert model.config.tap("text") == Tap(-1, "sentence_embedding", "none")
    assert isinstance(model.text_model, PeftModel) and isinstance(model.text_model.get_base_model(), SentenceEncoder)
    torch.manual_seed(0)
    for parameter in encoder_lora_parameters(model):  # as if trained: B no longer zero, so the adapter counts
        torch.nn.init.normal_(parameter, std=0.2)
    inputs = model.processor(images=random_images, text=CAPTIONS)
    with torch.no_grad():
        before = model(**inputs)
        with model.text_model.disable_adapter():
            plain = model.get_text_features(**{k: inputs[k] for k in ("input_ids", "attention_mask")})
    assert not torch.allclose(plain, before.text_embeds, atol=1e-3)
    model.save_pretrained(tmp_path / "bundle", bundle_encoders=True)
    bundled = tmp_path / "bundle" / "text_encoder"
    assert (bundled / "modules.json").is_file() and (bundled / "1_Pooling" / "config.json").is_file()
    # the transformers model's own tensors under their own names: no adapter, no pipeline step
    assert tensor_names(bundled / "model.safetensors") == set(AutoModel.from_pretrained(encoders[1]).state_dict())
    reloaded = AlignerModel.from_pretrained(tmp_path / "bundle")
    assert isinstance(reloaded.text_model.get_base_model(), SentenceEncoder)
    with torch.no_grad():
        after = reloaded(**inputs)
    torch.testing.assert_close(after.text_embeds, before.text_embeds, rtol=0, atol=0)
