"""Loading what someone else wrote (issue #21): a saved aligner, a sentence-transformers folder (local, downloaded or
bundled in an aligner), a LoRA adapter. Paths stay inside the folder, nothing is allocated past what the files hold,
pickles are never opened, every setting has an upper bound, and a damaged file is named."""

import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import typing

import pytest
import torch
from hub_server import serving, use_hub
from huggingface_hub import HfApi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from test_safe_loading import write_malicious_pickle
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from hf_align import AlignerConfig, AlignerModel
from hf_align.encoders import EncoderLoadError, load_encoder
from hf_align.encoders.sentence_pipeline import SentenceEncoder, SentencePipelineError, read_sentence_pipeline
from hf_align.methods import METHODS
from hf_align.regularizers import REGULARIZERS
from hf_align.similarity import SIMILARITIES
from hf_align.utils.checks import MAX_WIDTH, SETTING_BOUNDS
from hf_align.utils.safe_loading import ArtefactError, resolve_inside

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DENSE = {"in_features": 32, "out_features": 16, "bias": True, "activation_function": "torch.nn.modules.activation.Tanh"}


class AllocationRecorder(TorchDispatchMode):
    """The largest storage (bytes) any torch operation creates off the meta device while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self.largest = max(self.largest, tensor.untyped_storage().nbytes())
        return out


_OPENED: list[list[str]] = []  # one list per active `recording_opens`; audit hooks cannot be removed, so one hook


def _audit(event, args):
    if event == "open" and _OPENED and isinstance(args[0], str):
        _OPENED[-1].append(os.path.realpath(args[0]))


sys.addaudithook(_audit)


class recording_opens:
    """Every file Python opens while active (realpaths), from the interpreter's audit events."""

    def __enter__(self):
        _OPENED.append([])
        return _OPENED[-1]

    def __exit__(self, *exc):
        _OPENED.pop()


def write_json(path, value) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(value, handle)


def edit_json(path, **changes) -> None:
    with open(path) as handle:
        value = json.load(handle)
    value.update(changes)
    write_json(path, value)


def write_pipeline_modules(folder, transformer: str = "", dense_config: dict = DENSE, seed: int = 0) -> None:
    """A sentence-transformers pipeline in `folder`: Pooling (mean), Dense 32 -> 16, Normalize; the Transformer at
    `transformer` (the folder itself by default, where a model may already be saved)."""
    write_json(os.path.join(folder, "1_Pooling", "config.json"), {"pooling_mode_mean_tokens": True})
    write_json(os.path.join(folder, "2_Dense", "config.json"), dense_config)
    generator = torch.Generator().manual_seed(seed)
    weights = {"linear.weight": torch.randn(16, 32, generator=generator), "linear.bias": torch.zeros(16)}
    save_file(weights, os.path.join(folder, "2_Dense", "model.safetensors"))
    write_json(os.path.join(folder, "sentence_bert_config.json"), {"max_seq_length": 64})
    kinds = [("Transformer", transformer), ("Pooling", "1_Pooling"), ("Dense", "2_Dense"), ("Normalize", "3_Normalize")]
    write_json(
        os.path.join(folder, "modules.json"),
        [
            {"idx": i, "name": str(i), "path": p, "type": f"sentence_transformers.models.{k}"}
            for i, (k, p) in enumerate(kinds)
        ],
    )


def set_module_path(folder, idx: int, path) -> None:
    modules_file = os.path.join(folder, "modules.json")
    with open(modules_file) as handle:
        modules = json.load(handle)
    modules[idx]["path"] = path
    write_json(modules_file, modules)


@pytest.fixture
def st_folder(tiny_bert, tmp_path):
    """A sentence-transformers folder around the tiny BERT, and beside it `outside/`: a complete copy of every module
    (a model, Pooling, Dense), so that a path escaping into it would load without error."""
    folder = str(tmp_path / "st")
    shutil.copytree(tiny_bert, folder)
    write_pipeline_modules(folder)
    outside = str(tmp_path / "outside")
    shutil.copytree(tiny_bert, os.path.join(outside, "model"))
    write_pipeline_modules(outside, transformer="model", seed=1)
    return folder, outside


MODULE_INDEX = {"Transformer": 0, "Pooling": 1, "Dense": 2, "Normalize": 3}
OUTSIDE_TARGET = {"Transformer": "model", "Pooling": "1_Pooling", "Dense": "2_Dense", "Normalize": "2_Dense"}


def escaping_path(folder: str, outside: str, kind: str, how: str) -> str:
    target = os.path.join(outside, OUTSIDE_TARGET[kind])
    if how == "dotdot":
        return os.path.relpath(target, folder)
    if how == "absolute":
        return target
    os.symlink(target, os.path.join(folder, "linked"))
    return "linked"


# ---------------------------------------------------------------------------------------------- §1 modules.json paths
def test_a_sentence_transformers_folder_with_its_own_paths_loads(st_folder):
    folder, _ = st_folder
    encoder = load_encoder("text", folder, source="sentence_embedding")
    assert [type(step).__name__ for step in encoder.steps] == ["DenseStep", "NormalizeStep"]
    expected = load_file(os.path.join(folder, "2_Dense", "model.safetensors"))
    torch.testing.assert_close(encoder.steps[0].linear.weight, expected["linear.weight"], rtol=0, atol=0)


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
@pytest.mark.parametrize("kind", ["Transformer", "Pooling", "Dense", "Normalize"])
def test_module_paths_outside_the_folder_are_refused(st_folder, kind, how):
    folder, outside = st_folder
    path = escaping_path(folder, outside, kind, how)
    set_module_path(folder, MODULE_INDEX[kind], path)
    with recording_opens() as opened, pytest.raises(EncoderLoadError) as caught:
        load_encoder("text", folder, source="sentence_embedding")
    message = str(caught.value)
    assert re.search(rf"modules\.json module {MODULE_INDEX[kind]} \({kind}\) '{re.escape(path)}' ", message), message
    assert f"outside {folder!r}" in message
    assert not [p for p in opened if p.startswith(os.path.realpath(outside))]


@pytest.mark.parametrize("linked", ["1_Pooling/config.json", "2_Dense/config.json", "2_Dense/model.safetensors"])
def test_a_module_file_linking_outside_the_folder_is_refused(st_folder, linked):
    folder, outside = st_folder
    os.remove(os.path.join(folder, linked))
    os.symlink(os.path.join(outside, linked), os.path.join(folder, linked))
    with recording_opens() as opened, pytest.raises(EncoderLoadError, match=rf"resolves to .*, outside '{folder}"):
        load_encoder("text", folder, source="sentence_embedding")
    assert not [p for p in opened if p.startswith(os.path.realpath(outside))]


def test_paths_of_a_bundled_pipeline_stay_inside_its_subfolder(tiny_vit, st_folder, tmp_path):
    folder, _ = st_folder
    model = AlignerModel.from_encoders(tiny_vit, folder, projection_dim=4, text_source="sentence_embedding")
    bundle = str(tmp_path / "bundle")
    model.save_pretrained(bundle, bundle_encoders=True)
    reloaded = AlignerModel.from_pretrained(bundle)  # its own paths: loads
    assert reloaded.text_model.pipeline.steps[0]["path"] == "text_encoder/2_Dense"
    # inside the aligner's folder but outside the sentence-transformers folder it bundles: refused
    shutil.copytree(os.path.join(bundle, "text_encoder", "2_Dense"), os.path.join(bundle, "dense_beside"))
    set_module_path(os.path.join(bundle, "text_encoder"), 2, "../dense_beside")
    with pytest.raises(
        EncoderLoadError,
        match=rf"modules\.json module 2 \(Dense\) '\.\./dense_beside' points outside '{re.escape(bundle)}/text_encoder'",
    ):
        AlignerModel.from_pretrained(bundle)


def test_resolve_inside_accepts_what_is_inside_and_names_what_is_not(tmp_path):
    root = tmp_path / "artefact"
    (root / "a").mkdir(parents=True)
    assert resolve_inside(root, "a/../a/file", "entry") == os.path.join(str(root), "a", "file")
    assert resolve_inside(root, "", "entry") == str(root)
    for entry in ("..", "a/../../x", "/etc/passwd", 3, None, "a\x00b"):
        with pytest.raises(ArtefactError, match=rf"entry .*{re.escape(str(root))}"):
            resolve_inside(root, entry, "entry")
    # a Hub cache snapshot links its files into the repo's own blobs/ (huggingface_hub's layout): accepted
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "0123").write_text("{}")
    snapshot = repo / "snapshots" / ("0123456789abcdef" * 3)[:40]
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to("../../blobs/0123")
    assert resolve_inside(snapshot, "config.json", "entry") == str(snapshot / "config.json")
    (snapshot / "other.json").symlink_to(tmp_path / "artefact" / "a")
    with pytest.raises(ArtefactError, match=r"entry 'other.json' resolves to .*/artefact/a'?, outside"):
        resolve_inside(snapshot, "other.json", "entry")


@pytest.mark.slow
def test_a_downloaded_pipeline_loads_and_a_hostile_one_is_refused_before_download(st_folder, tmp_path, monkeypatch):
    folder, _ = st_folder
    with serving(monkeypatch) as hub:
        use_hub(monkeypatch, endpoint=hub.url, cache=tmp_path / "cache")
        api = HfApi(endpoint=hub.url, token="hf_standin")
        for repo_id, dense_path in (("me/st", "2_Dense"), ("me/st-hostile", "../../../../2_Dense")):
            api.create_repo(repo_id)
            set_module_path(folder, 2, dense_path)
            api.upload_folder(repo_id=repo_id, folder_path=folder)
        encoder = load_encoder("text", "me/st", source="sentence_embedding")  # cache files link into blobs/
        torch.testing.assert_close(
            encoder.steps[0].linear.bias, load_file(os.path.join(folder, "2_Dense", "model.safetensors"))["linear.bias"]
        )
        with pytest.raises(EncoderLoadError, match=r"module 2 \(Dense\) '\.\./\.\./\.\./\.\./2_Dense' points outside"):
            load_encoder("text", "me/st-hostile", source="sentence_embedding")
        assert not [path for method, path, _ in hub.requests if "2_Dense" in path and "st-hostile" in path]


# ---------------------------------------------------------------------------------------------- §2 widths vs weights
def _saved_aligner(folder, method="linear", **kwargs) -> str:
    AlignerModel.from_feature_dims(4, 4, method=method, **kwargs).save_pretrained(folder)
    return os.path.join(folder, "model.safetensors")


WIDE_CONFIGS = {
    "projection_dim": (
        {"projection_dim": 2},
        {"method_config": {"projection_dim": 60_000, "bias": False}},
        r"aligner.text_head.weight \(checkpoint \(2, 4\), config \(60000, 4\)\)",
    ),
    "num_anchors": (
        {"method": "asif", "num_anchors": 4, "topk": 2},
        {"method_config": {"num_anchors": 2**20, "topk": 2, "power": 8.0}},
        r"aligner.text_anchors \(checkpoint \(4, 4\), config \(1048576, 4\)\)",
    ),
    "num_codes": (
        {"method": "codebook", "projection_dim": 2, "num_codes": 4},
        {"method_config": {"projection_dim": 2, "num_codes": 60_000}},
        r"aligner.codebook \(checkpoint \(4, 2\), config \(60000, 2\)\)",
    ),
    "similarity hidden_dim": (
        {"projection_dim": 2, "similarity": "mlp", "similarity_config": {"hidden_dim": 4}},
        {"similarity_config": {"hidden_dim": 60_000}},
        r"similarity.image_in.weight \(checkpoint \(4, 2\), config \(60000, 2\)\)",
    ),
    "vision_hidden_size": (
        {"projection_dim": 2},
        {"vision_hidden_size": 60_000},
        r"aligner.vision_head.weight \(checkpoint \(2, 4\), config \(2, 60000\)\)",
    ),
}


@pytest.mark.parametrize("field", list(WIDE_CONFIGS))
def test_a_config_wider_than_its_weights_is_refused_before_any_tensor_is_created(field, tmp_path):
    build, change, mismatch = WIDE_CONFIGS[field]
    folder = str(tmp_path / "aligner")
    weights = _saved_aligner(folder, **build)
    edit_json(os.path.join(folder, "config.json"), **change)
    recorder = AllocationRecorder()
    with recorder, pytest.raises(ArtefactError, match=rf"do not match its config.json .*{mismatch}"):
        AlignerModel.from_pretrained(folder, load_encoders=False)
    assert recorder.largest <= os.path.getsize(weights)


def test_a_config_whose_weights_are_missing_is_refused_before_any_tensor_is_created(tmp_path):
    folder = str(tmp_path / "aligner")
    weights = _saved_aligner(folder, projection_dim=2)
    save_file({"logit_scale": load_file(weights)["logit_scale"]}, weights)
    edit_json(os.path.join(folder, "config.json"), method_config={"projection_dim": 60_000, "bias": False})
    recorder = AllocationRecorder()
    with (
        recorder,
        pytest.raises(
            ArtefactError,
            match=r"missing from the checkpoint \(would be random\): \['aligner.text_head.weight', "
            r"'aligner.vision_head.weight'\]",
        ),
    ):
        AlignerModel.from_pretrained(folder, load_encoders=False)
    assert recorder.largest <= os.path.getsize(weights)


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_a_shard_index_naming_a_file_outside_the_folder_is_refused(tmp_path, how):
    folder = str(tmp_path / "aligner")
    weights = _saved_aligner(folder, projection_dim=2)
    outside = str(tmp_path / "outside" / "model-00001.safetensors")
    os.makedirs(os.path.dirname(outside))
    shutil.move(weights, outside)
    shard = {"dotdot": "../outside/model-00001.safetensors", "absolute": outside, "symlink": "linked.safetensors"}[how]
    if how == "symlink":
        os.symlink(outside, os.path.join(folder, shard))
    names = list(load_file(outside))
    write_json(
        os.path.join(folder, "model.safetensors.index.json"),
        {"metadata": {}, "weight_map": dict.fromkeys(names, shard)},
    )
    with (
        recording_opens() as opened,
        pytest.raises(
            ArtefactError, match=rf"shard of '.*model.safetensors.index.json' '{re.escape(shard)}' .*outside '{folder}'"
        ),
    ):
        AlignerModel.from_pretrained(folder, load_encoders=False)
    assert outside not in opened


def test_a_dense_config_wider_than_its_weights_is_refused_before_allocation(st_folder):
    folder, _ = st_folder
    edit_json(os.path.join(folder, "2_Dense", "config.json"), out_features=60_000)
    pipeline = read_sentence_pipeline(folder)
    weights = os.path.join(folder, "2_Dense", "model.safetensors")
    recorder = AllocationRecorder()
    with (
        recorder,
        pytest.raises(
            SentencePipelineError,
            match=rf"Dense weights {re.escape(repr(weights))} do not match 2_Dense/config.json .*"
            r"'mismatched_keys': \[\('linear.bias', \(16,\), \(60000,\)\), \('linear.weight', \(16, 32\), \(60000, 32\)\)",
        ),
    ):
        SentenceEncoder.load(nn.Linear(1, 1), pipeline, folder)
    assert recorder.largest <= os.path.getsize(weights)
    edit_json(os.path.join(folder, "2_Dense", "config.json"), out_features=MAX_WIDTH + 1)
    with pytest.raises(SentencePipelineError, match=rf"needs an int out_features in \[1, {MAX_WIDTH}\], got 65537"):
        read_sentence_pipeline(folder)


def test_dense_weights_that_cannot_be_parameters_are_refused_naming_the_file(st_folder):
    folder, _ = st_folder
    weights = os.path.join(folder, "2_Dense", "model.safetensors")
    save_file({"linear.weight": torch.zeros(16, 32, dtype=torch.int64), "linear.bias": torch.zeros(16)}, weights)
    with pytest.raises(
        SentencePipelineError,
        match=rf"(?s)Dense weights {re.escape(repr(weights))} cannot be loaded: .*Only Tensors of floating point",
    ):
        SentenceEncoder.load(nn.Linear(1, 1), read_sentence_pipeline(folder), folder)


def test_a_pooling_config_without_modes_is_refused(st_folder):
    folder, _ = st_folder
    write_json(os.path.join(folder, "1_Pooling", "config.json"), {"pooling_mode": []})
    with pytest.raises(SentencePipelineError, match=r"1_Pooling config has pooling modes \[\]; known: \('cls'"):
        read_sentence_pipeline(folder)


# ---------------------------------------------------------------------------------------------- §2 setting bounds
def _int_settings():
    """(owner, how to build an aligner with the setting, field) for every int setting of every registered method,
    regulariser and similarity head (an `int | str` or `int | list[int]` field counts)."""
    found = []
    for registry, kind in ((METHODS, "method"), (REGULARIZERS, "regularizer"), (SIMILARITIES, "similarity")):
        for name, cls in sorted(registry.items()):
            hints = typing.get_type_hints(cls.config_class)
            for field in dataclasses.fields(cls.config_class):
                if int in (typing.get_args(hints[field.name]) or (hints[field.name],)):
                    found.append((kind, name, field.name))
    return found


def test_every_int_setting_has_an_upper_bound():
    settings_found = _int_settings()
    assert ("method", "linear", "projection_dim") in settings_found  # the walk finds what it should
    assert ("similarity", "mlp", "hidden_dim") in settings_found
    assert ("regularizer", "structure", "levels") in settings_found
    assert sorted({field for _, _, field in settings_found} - set(SETTING_BOUNDS)) == []


@pytest.mark.parametrize("kind, owner, field", _int_settings(), ids=lambda v: v)
def test_a_setting_above_its_bound_is_refused_by_name(kind, owner, field):
    too_big = SETTING_BOUNDS[field] + 1
    if kind == "method":
        build = {"method": owner, field: too_big}
    elif kind == "regularizer":
        build = {"regularizers": {owner: {field: too_big}}}
    else:
        build = {"similarity": owner, "similarity_config": {field: too_big}}
    label = re.escape(f"{owner!r}") if kind != "similarity" else re.escape(f"similarity {owner!r}")
    with pytest.raises(ValueError, match=rf"{label} setting {field}={too_big} is above its upper bound"):
        AlignerModel.from_feature_dims(8, 8, **build)


@pytest.mark.parametrize("field", ["vision_hidden_size", "text_num_layers", "vision_num_prefix_tokens"])
def test_aligner_config_widths_have_upper_bounds(field):
    too_big = SETTING_BOUNDS[field] + 1
    with pytest.raises(ValueError, match=rf"AlignerConfig setting {field}={too_big} is above its upper bound"):
        AlignerConfig(**{field: too_big})


# ---------------------------------------------------------------------------------------------- §5 LoRA, damaged files
@pytest.fixture(scope="module")
def full_bundle(tiny_vit, tiny_bert, tmp_path_factory):
    """An aligner bundling a ViT with a LoRA adapter and a sentence-transformers text encoder with a Dense layer."""
    root = tmp_path_factory.mktemp("full_bundle")
    st = str(root / "st")
    shutil.copytree(tiny_bert, st)
    write_pipeline_modules(st)
    lora = LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[-1])
    model = AlignerModel.from_encoders(
        tiny_vit, st, projection_dim=4, text_source="sentence_embedding", encoder_lora={"vision": lora}
    )
    bundle = str(root / "bundle")
    model.save_pretrained(bundle, bundle_encoders=True)
    return bundle


@pytest.fixture
def bundle_copy(full_bundle, tmp_path):
    copy = str(tmp_path / "bundle")
    shutil.copytree(full_bundle, copy)
    return copy


def test_a_pickle_lora_adapter_is_refused_without_being_unpickled(bundle_copy, tmp_path):
    AlignerModel.from_pretrained(bundle_copy)  # as saved: loads
    os.remove(os.path.join(bundle_copy, "vision_encoder_lora", "adapter_model.safetensors"))
    marker = tmp_path / "adapter_code_ran"
    write_malicious_pickle(os.path.join(bundle_copy, "vision_encoder_lora", "adapter_model.bin"), marker)
    with pytest.raises(
        ArtefactError,
        match=r"the vision encoder's LoRA adapter must be stored as vision_encoder_lora/adapter_model.safetensors, "
        r"found only a pickle file \(vision_encoder_lora/adapter_model.bin\); hf_align loads safetensors only",
    ):
        AlignerModel.from_pretrained(bundle_copy)
    assert not marker.exists()


def test_a_lora_rank_its_weights_do_not_have_is_refused_before_peft_builds_it(bundle_copy):
    adapter = os.path.join(bundle_copy, "vision_encoder_lora")
    assert {shape[0] for name, shape in _lora_a_shapes(adapter)} == {2}  # saved at r=2
    edit_json(os.path.join(adapter, "adapter_config.json"), r=4096)
    largest_file = max(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(bundle_copy) for f in files)
    recorder = AllocationRecorder()
    with (
        recorder,
        pytest.raises(
            ArtefactError,
            match=r"the vision encoder's LoRA adapter in vision_encoder_lora/: adapter_config.json asks for LoRA rank\(s\) "
            r"\{'r': 4096\}, but the largest rank in adapter_model.safetensors is 2",
        ),
    ):
        AlignerModel.from_pretrained(bundle_copy)
    assert recorder.largest <= largest_file


def _lora_a_shapes(adapter_folder):
    weights = load_file(os.path.join(adapter_folder, "adapter_model.safetensors"))
    return [(name, tuple(t.shape)) for name, t in weights.items() if ".lora_A." in name]


DAMAGED = {
    "aligner": ("model.safetensors", ArtefactError),
    "bundled encoder": ("vision_encoder/model.safetensors", EncoderLoadError),
    "Dense": ("text_encoder/2_Dense/model.safetensors", EncoderLoadError),
    "LoRA adapter": ("vision_encoder_lora/adapter_model.safetensors", ArtefactError),
}


@pytest.mark.parametrize("what", list(DAMAGED))
@pytest.mark.parametrize("keep", [0.5, 0.0001])
def test_a_truncated_weights_file_is_named(bundle_copy, what, keep):
    relative, error = DAMAGED[what]
    path = os.path.join(bundle_copy, relative)
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[: int(len(data) * keep)])
    with pytest.raises(error, match=rf"{re.escape(repr(path))} is not a readable safetensors file .*truncated"):
        AlignerModel.from_pretrained(bundle_copy)


# ---------------------------------------------------------------------------------------------- §6 properties
@pytest.fixture(scope="module")
def small_aligner(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("small_aligner") / "aligner")
    _saved_aligner(folder, projection_dim=2)
    return folder


HOSTILE_INTS = st.sampled_from([0, -1, 1, 2, 3, 4, 8, 2**16, 2**16 + 1, 2**21 + 1, 2**40, 2**63]) | st.integers(
    -5, 10**6
)
HOSTILE_VALUES = HOSTILE_INTS | st.sampled_from([None, "8", "auto", 1.5, float("nan"), True, [], [2**40], {}])
METHOD_FIELDS = ["projection_dim", "num_anchors", "num_codes", "hidden_dim", "topk", "queue_length", "bias"]
hostile_config = st.one_of(
    st.fixed_dictionaries(
        {
            "method": st.sampled_from(sorted(METHODS)),
            "method_config": st.dictionaries(st.sampled_from(METHOD_FIELDS), HOSTILE_VALUES, max_size=3),
        }
    ),
    st.fixed_dictionaries({"vision_hidden_size": HOSTILE_VALUES, "text_hidden_size": HOSTILE_VALUES}),
    st.fixed_dictionaries(
        {
            "similarity": st.sampled_from(sorted(SIMILARITIES)),
            "similarity_config": st.dictionaries(
                st.sampled_from(["hidden_dim", "num_hidden_layers", "max_chunk_elements", "interaction"]),
                HOSTILE_VALUES,
                max_size=2,
            ),
        }
    ),
    st.fixed_dictionaries(
        {
            "regularizers": st.dictionaries(
                st.just("structure"),
                st.dictionaries(st.sampled_from(["levels", "warmup_steps", "weight"]), HOSTILE_VALUES, max_size=2),
            )
        }
    ),
)


@FAST
@given(change=hostile_config)
def test_hostile_config_loads_within_the_weights_or_is_refused(small_aligner, change):
    with tempfile.TemporaryDirectory() as root:
        folder = shutil.copytree(small_aligner, os.path.join(root, "aligner"))
        edit_json(os.path.join(folder, "config.json"), **change)
        size = os.path.getsize(os.path.join(folder, "model.safetensors"))
        recorder = AllocationRecorder()
        try:
            with recorder:
                model = AlignerModel.from_pretrained(folder, load_encoders=False)
        except (ValueError, TypeError) as err:  # config checks (by field) and ArtefactError
            assert str(err)
        else:
            assert sum(t.numel() * t.element_size() for t in model.state_dict().values()) <= size
        assert recorder.largest <= size


@FAST
@given(
    config=st.fixed_dictionaries(
        {},
        optional={
            "in_features": HOSTILE_VALUES,
            "out_features": HOSTILE_VALUES,
            "bias": st.sampled_from([True, False, None, "no", 0]),
            "use_residual": st.sampled_from([True, False, "yes"]),
            "activation_function": st.sampled_from(["torch.nn.modules.activation.ReLU", "os.system", 5, None]),
        },
    )
)
def test_hostile_dense_config_loads_within_its_weights_or_is_refused(config):
    with tempfile.TemporaryDirectory() as root:
        folder = os.path.join(root, "st")
        write_pipeline_modules(folder, dense_config={**DENSE, **config})
        weights = os.path.join(folder, "2_Dense", "model.safetensors")
        recorder = AllocationRecorder()
        with recorder:
            try:
                encoder = SentenceEncoder.load(nn.Linear(1, 1), read_sentence_pipeline(folder), folder)
            except SentencePipelineError as err:
                assert folder in str(err)
            else:
                dense = encoder.steps[0]
                assert (dense.linear.in_features, dense.linear.out_features) == (32, 16)
                torch.testing.assert_close(dense.linear.weight, load_file(weights)["linear.weight"], rtol=0, atol=0)
        assert recorder.largest <= os.path.getsize(weights)


ENTRY_PATHS = ["", ".", "1_Pooling", "2_Dense", "3_Normalize", "./2_Dense", "x/../2_Dense", "..", "../outside/2_Dense"]
hostile_entry = st.one_of(
    st.sampled_from(ENTRY_PATHS),
    st.sampled_from(["@absolute", "@linked", None, 5, ["2_Dense"], "a\x00b"]),
    st.text(alphabet="./_aD2", max_size=12),
)
LAYOUTS = ["as written", "module folder links outside", "config links outside", "weights link outside", "missing"]


@FAST
@given(
    paths=st.lists(hostile_entry, min_size=4, max_size=4),
    layouts=st.lists(st.sampled_from(LAYOUTS), min_size=2, max_size=2),
    entry_kinds=st.sampled_from(["objects", "string entry", "no idx", "idx as text"]),
)
def test_hostile_modules_json_reads_only_inside_the_folder(tmp_path_factory, paths, layouts, entry_kinds):
    with tempfile.TemporaryDirectory() as root:
        folder, outside = os.path.join(root, "st"), os.path.join(root, "outside")
        write_pipeline_modules(folder)
        write_pipeline_modules(outside, seed=1)
        for module, layout in zip(("1_Pooling", "2_Dense"), layouts):
            target = os.path.join(folder, module)
            if layout == "module folder links outside":
                shutil.rmtree(target)
                os.symlink(os.path.join(outside, module), target)
            elif layout == "missing":
                shutil.rmtree(target)
            elif layout != "as written":
                name = "config.json" if layout == "config links outside" else "model.safetensors"
                if os.path.exists(os.path.join(target, name)):
                    os.remove(os.path.join(target, name))
                    os.symlink(os.path.join(outside, module, name), os.path.join(target, name))
        os.symlink(os.path.join(outside, "2_Dense"), os.path.join(folder, "linked"))
        special = {"@absolute": os.path.join(outside, "2_Dense"), "@linked": "linked"}
        with open(os.path.join(folder, "modules.json")) as handle:
            modules = json.load(handle)
        for module, path in zip(modules, paths):
            module["path"] = special.get(path, path) if isinstance(path, str) else path
        if entry_kinds == "string entry":
            modules[3] = "sentence_transformers.models.Normalize"
        elif entry_kinds == "no idx":
            del modules[0]["idx"]
        elif entry_kinds == "idx as text":
            modules[1]["idx"] = "1"
        write_json(os.path.join(folder, "modules.json"), modules)
        dense_weights = os.path.join(outside, "2_Dense", "model.safetensors")
        recorder = AllocationRecorder()
        with recording_opens() as opened, recorder:
            try:
                pipeline = read_sentence_pipeline(folder)
                encoder = SentenceEncoder.load(nn.Linear(1, 1), pipeline, folder)
            except SentencePipelineError as err:
                assert repr(folder) in str(err) or folder in str(err)
            else:
                for path in [pipeline.transformer_path, *(s["path"] for s in pipeline.steps if "path" in s)]:
                    resolve_inside(folder, path, "loaded module path")
                assert len(encoder.steps) == len(pipeline.steps)
        assert not [p for p in opened if p.startswith(os.path.realpath(outside))]
        assert recorder.largest <= os.path.getsize(dense_weights)
