"""Safe loading: safetensors only, no remote code, and a config that does not fit its weights or its encoders fails
with a specific error before any weight is used."""

import hashlib
import json
import logging
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

import hf_align
from hf_align import AlignerModel
from hf_align.encoders import EncoderLoadError
from hf_align.testing import make_paired_task, save_tiny_vision_encoder
from hf_align.training import AlignmentArguments, train
from hf_align.training.checkpoints import CheckpointError
from hf_align.utils.safe_loading import ArtefactError


class _Payload:
    """A pickle that creates a folder when unpickled: proof that a loader ran code from the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def write_malicious_pickle(path, marker):
    with open(path, "wb") as handle:
        pickle.dump({"aligner.vision_head.weight": _Payload(str(marker))}, handle, protocol=2)


def edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as handle:
        config = json.load(handle)
    config.update(changes)
    with open(path, "w") as handle:
        json.dump(config, handle)


@pytest.fixture
def saved(tiny_vit, tiny_bert, tmp_path):
    model = AlignerModel.from_encoders(tiny_vit, tiny_bert, projection_dim=8)
    folder = str(tmp_path / "aligner")
    model.save_pretrained(folder)
    return model, folder


def test_pickle_only_checkpoint_is_refused_without_being_unpickled(saved, tmp_path):
    _, folder = saved
    os.remove(os.path.join(folder, "model.safetensors"))
    marker = tmp_path / "code_ran"
    write_malicious_pickle(os.path.join(folder, "pytorch_model.bin"), marker)
    message = r"holds only a pickle checkpoint \(pytorch_model.bin\) and no model.safetensors; hf_align refuses pickle"
    with pytest.raises(OSError, match=message):
        AlignerModel.from_pretrained(folder)
    with pytest.raises(OSError, match=message):
        AutoModel.from_pretrained(folder)  # the Auto class goes through the same door
    with pytest.raises(
        ValueError,
        match=r"use_safetensors=False is not supported: hf_align loads aligner weights from safetensors only",
    ):
        AlignerModel.from_pretrained(folder, use_safetensors=False)
    assert not marker.exists()


def test_missing_weights_without_pickle_keep_transformers_error(saved):
    _, folder = saved
    os.remove(os.path.join(folder, "model.safetensors"))
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AlignerModel.from_pretrained(folder)


def test_bundled_encoders_load_from_safetensors_only(tiny_vit, tiny_bert, tmp_path):
    model = AlignerModel.from_encoders(tiny_vit, tiny_bert, projection_dim=8)
    folder = str(tmp_path / "bundle")
    model.save_pretrained(folder, bundle_encoders=True)
    vision = os.path.join(folder, "vision_encoder")
    state = load_file(os.path.join(vision, "model.safetensors"))
    os.remove(os.path.join(vision, "model.safetensors"))
    torch.save(state, os.path.join(vision, "pytorch_model.bin"))
    with pytest.raises(OSError, match=r"bundle' holds only a pickle checkpoint \(vision_encoder/pytorch_model.bin\)"):
        AlignerModel.from_pretrained(folder)


def test_encoder_with_remote_code_is_never_executed(tiny_bert, tmp_path):
    repo = tmp_path / "custom_encoder"
    repo.mkdir()
    marker = tmp_path / "remote_code_ran"
    (repo / "config.json").write_text(
        json.dumps(
            {
                "model_type": "my_custom_encoder",
                "auto_map": {"AutoConfig": "modeling_custom.MyConfig", "AutoModel": "modeling_custom.MyModel"},
            }
        )
    )
    (repo / "modeling_custom.py").write_text(f"import os\nos.makedirs({str(marker)!r})\n")
    with pytest.raises(
        EncoderLoadError, match=r"vision_encoder=.*custom_encoder' could not be loaded as a transformers AutoModel"
    ):
        AlignerModel.from_encoders(str(repo), tiny_bert)
    assert not marker.exists()


def test_encoder_width_that_does_not_match_the_weights_is_refused(saved, tmp_path):
    _, folder = saved
    wider = save_tiny_vision_encoder(str(tmp_path / "wider_vit"), "vit", hidden_size=48)
    edit_config(folder, vision_encoder=wider)
    with pytest.raises(
        ValueError,
        match=r"vision encoder '.*wider_vit' gives width 48 at last_hidden_state · cls, but the aligner weights expect "
        r"vision_hidden_size=32",
    ):
        AlignerModel.from_pretrained(folder)


def test_unknown_method_in_config_is_refused_before_loading_weights(saved):
    _, folder = saved
    edit_config(folder, method="from_the_future")
    with pytest.raises(ValueError, match=r"unknown method 'from_the_future'; registered methods: \[.*'linear'.*\]"):
        AlignerModel.from_pretrained(folder)


def test_unknown_method_setting_in_config_is_refused(saved):
    _, folder = saved
    edit_config(folder, method_config={"projection_dim": 8, "bias": False, "quantum": True})
    with pytest.raises(TypeError, match=r"'linear' got unknown argument\(s\) \['quantum'\]"):
        AlignerModel.from_pretrained(folder)


def test_weights_that_do_not_fit_the_config_are_refused(saved):
    _, folder = saved
    edit_config(folder, method="mlp", method_config={"projection_dim": 8})
    with pytest.raises(
        ValueError,
        match=r"do not match its config.json .*missing from the checkpoint \(would be random\): "
        r"\['aligner.text_head.alpha'.*"
        r"in the checkpoint but not in the model: \['aligner.text_head.weight', 'aligner.vision_head.weight'\]",
    ):
        AlignerModel.from_pretrained(folder, load_encoders=False)
    edit_config(folder, method="linear", method_config={"projection_dim": 16, "bias": False})
    # refused from the weights' header, before transformers builds anything, with or without ignore_mismatched_sizes
    for ignore in (False, True):
        with pytest.raises(
            ArtefactError,
            match=r"of another shape than the config gives: "
            r"\['aligner.text_head.weight \(checkpoint \(8, 32\), config \(16, 32\)\)'",
        ):
            AlignerModel.from_pretrained(folder, load_encoders=False, ignore_mismatched_sizes=ignore)


def test_revision_that_no_longer_resolves_is_named(saved):
    _, folder = saved
    edit_config(folder, vision_encoder="some-org/deleted-encoder", vision_revision="0123456789abcdef")
    with pytest.raises(
        EncoderLoadError,
        match=r"vision_encoder='some-org/deleted-encoder' at vision_revision='0123456789abcdef' could not be "
        r"loaded as a "
        r"transformers AutoModel \(HF_HUB_OFFLINE is set",
    ):
        AlignerModel.from_pretrained(folder)


def test_config_records_version_and_names_fields_from_a_newer_version(saved, caplog):
    model, folder = saved
    with open(os.path.join(folder, "config.json")) as handle:
        assert json.load(handle)["hf_align_version"] == hf_align.__version__
    edit_config(folder, hf_align_version="9.0.0", gizmo_size=3, future_mode="warp")
    with caplog.at_level(logging.WARNING, logger="hf_align.model.configuration"):
        reloaded = AlignerModel.from_pretrained(folder)
    assert (
        f"AlignerConfig got fields that hf_align {hf_align.__version__} does not know: ['future_mode', 'gizmo_size'] "
        "(config written by hf_align 9.0.0)"
    ) in caplog.text
    features = torch.randn(2, 32)
    torch.testing.assert_close(
        reloaded.get_image_features(vision_features=features), model.get_image_features(vision_features=features)
    )
    # saving again stamps the version that wrote the file
    reloaded.save_pretrained(folder)
    with open(os.path.join(folder, "config.json")) as handle:
        assert json.load(handle)["hf_align_version"] == hf_align.__version__


def test_output_loading_info_is_still_available(saved):
    _, folder = saved
    model, info = AlignerModel.from_pretrained(folder, load_encoders=False, output_loading_info=True)
    assert isinstance(model, AlignerModel)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_checkpoint_optimizer_state_is_loaded_with_weights_only(tmp_path):
    features = make_paired_task(n=64, vision_dim=4, text_dim=4, n_vision_layers=1, n_text_layers=1).to_features()
    out = str(tmp_path / "run")
    args = AlignmentArguments(
        output_dir=out, max_steps=2, save_steps=2, per_device_train_batch_size=16, eval_fraction=0.0
    )
    train(AlignerModel.from_feature_dims(4, 4, projection_dim=2), features, args)
    checkpoint = os.path.join(out, "checkpoint-2")
    marker = tmp_path / "optimizer_code_ran"
    write_malicious_pickle(os.path.join(checkpoint, "optimizer.pt"), marker)
    shutil.rmtree(os.path.join(out, "model.safetensors"), ignore_errors=True)
    args = AlignmentArguments(
        output_dir=out,
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=16,
        eval_fraction=0.0,
        resume_from_checkpoint="latest",
    )
    # The checkpoint's manifest recorded another optimizer.pt: refused as damaged, never unpickled.
    with pytest.raises(CheckpointError, match=r"every checkpoint .* is damaged \(.*optimizer.pt: \d+ bytes"):
        train(AlignerModel.from_feature_dims(4, 4, projection_dim=2), features, args)
    assert not marker.exists()
    # Whoever can write the folder can forge the manifest too: then weights_only still refuses to run the pickle.
    with open(os.path.join(checkpoint, "optimizer.pt"), "rb") as handle:
        forged = {"size": os.path.getsize(handle.name), "sha256": hashlib.sha256(handle.read()).hexdigest()}
    with open(os.path.join(checkpoint, "trainer_state.json")) as handle:
        state = json.load(handle)
    state["checkpoint"]["files"]["optimizer.pt"] = forged
    with open(os.path.join(checkpoint, "trainer_state.json"), "w") as handle:
        json.dump(state, handle)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train(AlignerModel.from_feature_dims(4, 4, projection_dim=2), features, args)
    assert not marker.exists()
