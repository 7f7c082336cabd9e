"""Hub round trip against real HTTP servers on loopback (no internet).

Downloads: an `olah` mirror (the PyPI package, a self-hosted Hub mirror) serves local git repositories of two tiny
encoders and of a saved aligner; huggingface_hub fetches them through it into an empty cache and
`AlignerModel.from_pretrained("org/aligner")` rebuilds the model from that cache, encoders at the pinned commits.
olah 0.5.4 answers a request for a file that a local mirror lacks with 401 RepoNotFound (HEAD) / 500 (GET) rather than
the Hub's 404 EntryNotFound, and transformers treats that as fatal while probing optional files
(adapter_config.json, ...), so the transformers loaders read the cache filled through the mirror (HF_HUB_OFFLINE)
instead of talking to olah directly.

Uploads: `StandInHub` (tests/hub_server.py), a minimal stdlib HTTP server, stands in for the Hub: it implements the
create-repo, validate-yaml, preupload and commit calls huggingface_hub 2.4 makes for a commit (every file
uploaded "regular", base64 in the commit payload) and keeps what was committed.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch
from hub_server import serving, use_hub
from huggingface_hub import ModelCard, snapshot_download
from safetensors.torch import load as load_safetensors

import hf_align
from hf_align.commands.cli import main as cli_main
from hf_align.model.hub import upload_aligner, uploaded_files
from hf_align.testing import digits_dataset, save_tiny_text_encoder, save_tiny_vision_encoder

PROCESSOR_FILES = {"processor_config.json", "tokenizer.json", "tokenizer_config.json"}  # transformers 5 layout


# ---------------------------------------------------------------------------------------------- olah mirror
def git_commit(path) -> str:
    """Commit everything in `path` (a new repository) and return the commit hash."""
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "t@e.st",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "t@e.st",
    }
    for command in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "upload"]):
        subprocess.run(command, cwd=path, check=True, env=env)
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=path, check=True, capture_output=True, text=True
    ).stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def olah_mirror(tmp_path_factory):
    """An olah server (offline: it never calls huggingface.co) mirroring git repos under <root>/mirrors/models/org."""
    if shutil.which("git") is None:
        pytest.fail("the olah round trip needs the git executable (olah serves local git repositories)")
    root = tmp_path_factory.mktemp("olah")
    org = root / "mirrors" / "models" / "org"
    shas = {
        "org/tiny-vit": git_commit(save_tiny_vision_encoder(str(org / "tiny-vit"), "vit")),
        "org/tiny-bert": git_commit(save_tiny_text_encoder(str(org / "tiny-bert"))),
    }
    port = free_port()
    (root / "olah.toml").write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{root / "cache"}"\n'
        f'mirrors-path = ["{root / "mirrors"}"]\n[accessibility]\noffline = true\n'
    )
    log = open(root / "olah.out", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "olah.server", "-c", str(root / "olah.toml")], cwd=root, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            try:
                urllib.request.urlopen(f"{url}/org/tiny-vit/resolve/main/config.json", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError):
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"olah did not start: {(root / 'olah.out').read_text()[-2000:]}")
                time.sleep(0.5)
        yield url, org, shas
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_from_pretrained_round_trip_through_olah(olah_mirror, tmp_path, monkeypatch):
    url, org, shas = olah_mirror
    # 1. fetch the encoders through the mirror and build an aligner on their Hub ids
    use_hub(monkeypatch, endpoint=url, cache=tmp_path / "cache_a")
    for repo, sha in shas.items():
        assert os.path.basename(snapshot_download(repo)) == sha
    use_hub(monkeypatch, offline=True)
    model = hf_align.AlignerModel.from_encoders("org/tiny-vit", "org/tiny-bert", projection_dim=8)
    assert (model.config.vision_encoder, model.config.vision_revision) == ("org/tiny-vit", shas["org/tiny-vit"])
    assert (model.config.text_encoder, model.config.text_revision) == ("org/tiny-bert", shas["org/tiny-bert"])
    digits = digits_dataset(12)
    metrics = hf_align.evaluate_retrieval(
        model, model.processor, digits, dataset_name="sklearn/digits", dataset_split="test"
    )
    model.model_card_data.add_evaluation(metrics)
    model.save_pretrained(org / "aligner")
    git_commit(org / "aligner")

    # 2. another machine: an empty cache and the repo id; the aligner names its encoders and their commits
    use_hub(monkeypatch, cache=tmp_path / "cache_b", offline=False)
    folder = snapshot_download("org/aligner")
    config = json.loads(open(os.path.join(folder, "config.json")).read())
    for modality in ("vision", "text"):
        snapshot_download(config[f"{modality}_encoder"], revision=config[f"{modality}_revision"])
    use_hub(monkeypatch, offline=True)
    loaded = hf_align.AlignerModel.from_pretrained("org/aligner")

    assert {"config.json", "model.safetensors", "README.md"} | PROCESSOR_FILES <= set(os.listdir(folder))
    # the encoders are the mirror's weights, not re-initialised ones
    for name in ("vision_model", "text_model"):
        original, reloaded = getattr(model, name).state_dict(), getattr(loaded, name).state_dict()
        assert original.keys() == reloaded.keys()
        assert all(torch.equal(original[k], reloaded[k]) for k in original)
    assert all(torch.equal(v, loaded.aligner_state_dict()[k]) for k, v in model.aligner_state_dict().items())
    inputs = loaded.processor(images=digits[:3]["image"], text=digits[:3]["caption"])
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits_per_image, model(**inputs).logits_per_image)
    card = ModelCard.load(os.path.join(folder, "README.md"))
    assert card.data.base_model == ["org/tiny-vit", "org/tiny-bert"]
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == metrics


# ---------------------------------------------------------------------------------------------- stand-in Hub
@pytest.fixture
def stand_in_hub(monkeypatch):
    with serving(monkeypatch) as hub:
        yield hub


@pytest.fixture(scope="module")
def evaluated_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    model = hf_align.AlignerModel.from_encoders(
        save_tiny_vision_encoder(str(root / "vit"), "vit"), save_tiny_text_encoder(str(root / "bert")), projection_dim=8
    )
    metrics = hf_align.evaluate_retrieval(model, model.processor, digits_dataset(12), dataset_name="sklearn/digits")
    hf_align.record_evaluation(model, metrics)
    return model, metrics


def check_uploaded_aligner(files: dict[str, bytes], repo_id: str, metrics: dict) -> None:
    assert {"config.json", "model.safetensors", "README.md"} | PROCESSOR_FILES <= set(files)
    weights = load_safetensors(files["model.safetensors"])
    assert set(weights) == {"logit_scale", "aligner.vision_head.weight", "aligner.text_head.weight"}
    assert json.loads(files["config.json"])["model_type"] == "hf_align"
    card = ModelCard(files["README.md"].decode())
    assert f'AlignerModel.from_pretrained("{repo_id}")' in card.text
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == metrics
    assert card.data.to_dict()["model-index"][0]["name"] == repo_id


def test_push_to_hub_uploads_weights_processor_and_card(stand_in_hub, evaluated_model):
    model, metrics = evaluated_model
    info = model.push_to_hub("me/digits-aligner", token="hf_standin", tags=["digits"])
    assert info.commit_url.startswith(f"{stand_in_hub.url}/me/digits-aligner/commit/")
    files = stand_in_hub.files("me/digits-aligner")
    check_uploaded_aligner(files, "me/digits-aligner", metrics)
    assert "digits" in ModelCard(files["README.md"].decode()).data.tags
    posts = [(path, auth) for method, path, auth in stand_in_hub.requests if method == "POST"]
    assert [path for path, _ in posts] == [
        "/api/repos/create",
        "/api/validate-yaml",
        "/api/models/me/digits-aligner/preupload/main",
        "/api/models/me/digits-aligner/commit/main",
    ]
    assert {auth for _, auth in posts} == {"Bearer hf_standin"}
    # a second push goes to the now existing repo (the Hub answers 409 to create, huggingface_hub carries on)
    model.push_to_hub("me/digits-aligner", token="hf_standin", commit_message="again")
    assert sum(path.endswith("/commit/main") for _, path, _ in stand_in_hub.requests) == 2


def test_cli_push_uploads_a_saved_folder(stand_in_hub, evaluated_model, tmp_path):
    model, metrics = evaluated_model
    folder = tmp_path / "run"
    model.save_pretrained(folder)
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "optimizer.pt").write_bytes(b"state")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "lock").write_bytes(b"")
    assert cli_main(["push", "--model_dir", str(folder), "--repo_id", "me/from-cli", "--tags", "cli", "digits"]) == 0
    files = stand_in_hub.files("me/from-cli")
    check_uploaded_aligner(files, "me/from-cli", metrics)
    assert not any(path.startswith(("checkpoint-", ".")) for path in files)
    assert {"cli", "digits"} <= set(ModelCard(files["README.md"].decode()).data.tags)
    # the folder's own card still names the folder
    assert f'from_pretrained("{folder}")' in (folder / "README.md").read_text()


def test_save_pretrained_push_to_hub_pushes_the_finished_folder(stand_in_hub, evaluated_model, tmp_path):
    model, metrics = evaluated_model
    model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="me/saved", commit_message="from save")
    check_uploaded_aligner(stand_in_hub.files("me/saved"), "me/saved", metrics)


def test_push_with_bundled_encoders_uploads_their_folders(stand_in_hub, evaluated_model):
    model, metrics = evaluated_model
    model.push_to_hub("me/bundled", bundle_encoders=True)
    files = stand_in_hub.files("me/bundled")
    check_uploaded_aligner(files, "me/bundled", metrics)
    assert {"vision_encoder/config.json", "vision_encoder/model.safetensors", "text_encoder/model.safetensors"} <= set(
        files
    )
    assert json.loads(files["config.json"])["bundled_encoders"] is True
    # transformers 5 saves under the checkpoint's original key names: compare the tensors, not the names
    uploaded = load_safetensors(files["vision_encoder/model.safetensors"]).values()
    own = model.vision_model.state_dict().values()
    assert sorted(t.double().sum().item() for t in uploaded) == pytest.approx(
        sorted(t.double().sum().item() for t in own)
    )
    assert "bundled under `vision_encoder/` and `text_encoder/`" in files["README.md"].decode()
    assert model.config.bundled_encoders is False  # the in-memory model is unchanged


def test_uploaded_files_leave_out_training_leftovers_and_hidden_files(tmp_path):
    for path in (
        "config.json",
        "vision_encoder/model.safetensors",
        "vision_encoder/checkpoint-3/kept.json",  # not one of a bundled encoder's files either
        "checkpoint-10/optimizer.pt",
        "runs/events.out",
        ".cache/lock",
        "text_encoder/.hidden",
    ):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"x")
    assert uploaded_files(tmp_path) == ["config.json", "vision_encoder/model.safetensors"]


def test_upload_needs_a_saved_folder(evaluated_model, tmp_path):
    model, _ = evaluated_model
    with pytest.raises(
        ValueError, match=r"folder='.*' holds no config.json: save the aligner there with save_pretrained"
    ):
        upload_aligner(model, tmp_path, "me/nothing")


def test_cli_push_needs_a_saved_folder(tmp_path):
    with pytest.raises(
        ValueError, match=r"model_dir='.*missing' is not a folder; give the output_dir of a saved aligner"
    ):
        cli_main(["push", "--model_dir", str(tmp_path / "missing"), "--repo_id", "me/x"])
