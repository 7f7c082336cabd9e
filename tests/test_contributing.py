"""CONTRIBUTING.md's walk-through for adding a method runs as written: its `centered_linear` module, placed in
`hf_align/methods/`, registers a method that builds, trains from its data-dependent start, saves and reloads."""

import re
import sys
import types
from pathlib import Path

import pytest
import torch

from hf_align import AlignerModel
from hf_align.methods import METHODS

CONTRIBUTING = Path(__file__).resolve().parents[1] / "CONTRIBUTING.md"


@pytest.fixture
def centered_linear(monkeypatch):
    text = CONTRIBUTING.read_text(encoding="utf-8")
    source = re.search(r"`hf_align/methods/centered_linear\.py`:\n```python\n(.*?)```", text, re.DOTALL).group(1)
    module = types.ModuleType("hf_align.methods.centered_linear")
    module.__package__ = "hf_align.methods"  # its relative imports resolve as in the package
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(METHODS, "_entries", dict(METHODS._entries))  # the registration is undone after the test
    exec(compile(source, "CONTRIBUTING.md:centered_linear.py", "exec"), module.__dict__)
    return module


def test_the_walkthrough_method_registers_builds_and_round_trips(centered_linear, tmp_path):
    assert METHODS["centered_linear"] is centered_linear.CenteredLinearAligner
    torch.manual_seed(0)
    model = AlignerModel.from_feature_dims(3, 2, method="centered_linear", projection_dim=4)
    vision, text = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    model.aligner.init_from_data(vision, text)
    torch.testing.assert_close(model.aligner.vision_mean, torch.tensor([2.0, 2.0, 2.0]))
    torch.testing.assert_close(model.aligner.text_mean, torch.tensor([0.5, 1.5]))
    head = model.aligner.vision_head.weight
    torch.testing.assert_close(model.aligner.embed_image(vision), (vision - 2.0) @ head.T)
    model.save_pretrained(tmp_path)
    reloaded = AlignerModel.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded.aligner.text_mean, torch.tensor([0.5, 1.5]))
    torch.testing.assert_close(reloaded.aligner.embed_text(text), model.aligner.embed_text(text))
    with pytest.raises(ValueError, match="projection_dim must be a positive int, got 0"):
        AlignerModel.from_feature_dims(3, 2, method="centered_linear", projection_dim=0)
