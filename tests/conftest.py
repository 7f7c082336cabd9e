"""Shared fixtures: tiny encoders saved once per session, loaded by path exactly like Hub encoders. Offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from hf_align.testing import minilm_path, save_tiny_text_encoder, save_tiny_vision_encoder  # noqa: E402


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("encoders")


@pytest.fixture(scope="session")
def tiny_vit(encoder_dir):
    return save_tiny_vision_encoder(str(encoder_dir / "vit"), "vit")


@pytest.fixture(scope="session")
def tiny_bert(encoder_dir):
    return save_tiny_text_encoder(str(encoder_dir / "bert"))


@pytest.fixture(scope="session")
def tiny_vision_encoders(encoder_dir):
    """Every supported tiny vision tower kind -> its saved folder."""
    return {
        kind: save_tiny_vision_encoder(str(encoder_dir / kind), kind) for kind in ("vit", "dinov2", "clip", "convnext")
    }


@pytest.fixture(scope="session")
def minilm():
    return minilm_path()


@pytest.fixture(scope="session")
def random_images():
    """Four 32×32 RGB PIL images of uniform noise (seed 0), the tiny encoders' input size."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]


@pytest.fixture
def stop_training_after(monkeypatch):
    """`stop(model, n)`: the next `train(model, ...)` raises KeyboardInterrupt right after its n-th optimiser step
    (a run killed mid-training, at a point the test chooses)."""

    def stop(model, n_steps: int) -> None:
        step, done = model.aligner.after_optimizer_step, []

        def dying_step():
            step()
            done.append(1)
            if len(done) == n_steps:
                raise KeyboardInterrupt

        monkeypatch.setattr(model.aligner, "after_optimizer_step", dying_step)

    return stop
