"""hf_align.functional.geometry: modality gap, Gaussian / sample W2 (checked against POT), alignment and uniformity."""

import math

import numpy as np
import pytest
import torch

from hf_align.functional.geometry import alignment_uniformity, gaussian_w2, modality_gap, sample_w2


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------- modality gap
def test_modality_gap_is_zero_for_identical_distributions():
    x = _rng().normal(size=(200, 8))
    assert modality_gap(x, x) == pytest.approx(0.0, abs=1e-12)
    # same rows in another order, and rescaled rows (normalisation removes the scale): still no gap
    assert modality_gap(x, 3.0 * x[::-1]) == pytest.approx(0.0, abs=1e-12)


def test_modality_gap_hand_computed():
    # image rows all point along e1, text rows along e2: centroids e1 and e2, gap sqrt(2)
    images = np.array([[2.0, 0.0], [5.0, 0.0]])
    texts = np.array([[0.0, 1.0], [0.0, 0.5], [0.0, 7.0]])
    assert modality_gap(images, texts) == pytest.approx(math.sqrt(2))
    # half-way rotated cone: image centroid (1, 0), text centroid mean of (1,0),(0,1) = (.5,.5) -> gap sqrt(.5)
    texts = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert modality_gap(images, texts) == pytest.approx(math.sqrt(0.5))


def test_modality_gap_accepts_torch_and_checks_widths():
    x = torch.randn(10, 4, requires_grad=True)
    assert modality_gap(x, x.detach()) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="same width"):
        modality_gap(torch.randn(5, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match="2-D"):
        modality_gap(torch.randn(5), torch.randn(5))
    with pytest.raises(ValueError, match="zero row"):
        modality_gap(np.zeros((2, 3)), np.ones((2, 3)))


# ---------------------------------------------------------------------------------------------- Gaussian W2
def test_gaussian_w2_equal_covariances_is_centroid_distance():
    x = _rng(1).normal(size=(500, 6)) @ _rng(2).normal(size=(6, 6))
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0, 1.0])
    # a shifted copy has exactly the same sample covariance: W2 = |shift|
    assert gaussian_w2(x, x + shift) == pytest.approx(np.linalg.norm(shift), rel=1e-9)
    assert gaussian_w2(x, x) == pytest.approx(0.0, abs=1e-6)


def test_gaussian_w2_closed_form_for_isotropic_gaussians():
    # N(0, s1² I) vs N(m, s2² I) in d dims: W2² = |m|² + d (s1 − s2)². Built with exact sample moments.
    d, n = 4, 4000
    z = _rng(3).normal(size=(n, d))
    z = z - z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whiten: sample covariance = I exactly
    m = np.array([1.0, 2.0, 0.0, -1.0])
    expected = math.sqrt(np.sum(m**2) + d * (1.0 - 3.0) ** 2)
    assert gaussian_w2(1.0 * z, 3.0 * z + m) == pytest.approx(expected, rel=1e-9)


def test_gaussian_w2_is_symmetric_and_matches_scipy_sqrtm():
    from scipy.linalg import sqrtm

    a = _rng(4).normal(size=(300, 5))
    b = _rng(5).normal(size=(200, 5)) @ np.diag([1.0, 2.0, 0.5, 1.5, 1.0]) + 0.3
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = sqrtm(ca @ cb).real
    reference = math.sqrt(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca + cb - 2 * covmean))
    assert gaussian_w2(a, b) == pytest.approx(reference, rel=1e-6)
    assert gaussian_w2(b, a) == pytest.approx(reference, rel=1e-6)


def test_gaussian_w2_needs_two_rows():
    with pytest.raises(ValueError, match="at least 2 rows"):
        gaussian_w2(np.ones((1, 3)), np.ones((4, 3)))


# ---------------------------------------------------------------------------------------------- sample W2
@pytest.mark.parametrize("sizes", [(30, 30), (25, 40), (17, 9)])
def test_sample_w2_matches_pot_exact_solver(sizes):
    ot = pytest.importorskip("ot")
    a = _rng(6).normal(size=(sizes[0], 5))
    b = _rng(7).normal(size=(sizes[1], 5)) * 1.5 + 0.7
    weights_a = np.full(sizes[0], 1.0 / sizes[0])
    weights_b = np.full(sizes[1], 1.0 / sizes[1])
    reference = math.sqrt(ot.emd2(weights_a, weights_b, ot.dist(a, b)))  # ot.dist: squared Euclidean
    assert sample_w2(a, b) == pytest.approx(reference, rel=1e-8)
    assert sample_w2(torch.as_tensor(a), torch.as_tensor(b)) == pytest.approx(reference, rel=1e-6)


def test_sample_w2_hand_computed():
    # two points to two points: the best matching pairs (0,0)->(0,1) and (4,0)->(4,1), each cost 1 -> W2 = 1
    a = np.array([[0.0, 0.0], [4.0, 0.0]])
    b = np.array([[4.0, 1.0], [0.0, 1.0]])
    assert sample_w2(a, b) == pytest.approx(1.0)
    # one point to two points: all mass of a goes half to each: W2² = (1 + 9) / 2
    assert sample_w2(np.array([[0.0]]), np.array([[1.0], [-3.0]])) == pytest.approx(math.sqrt(5.0))
    assert sample_w2(a, a) == pytest.approx(0.0, abs=1e-12)


def test_sample_w2_subsampling_is_reproducible():
    a, b = _rng(8).normal(size=(300, 3)), _rng(9).normal(size=(280, 3))
    first = sample_w2(a, b, max_samples=50, seed=1)
    assert first == sample_w2(a, b, max_samples=50, seed=1)
    assert first > 0


# ---------------------------------------------------------------------------------------------- Wang & Isola
def test_alignment_uniformity_hand_computed():
    # images e1, e2; texts e1, -e2 -> pair distances 0 and 2
    images = np.array([[1.0, 0.0], [0.0, 1.0]])
    texts = np.array([[1.0, 0.0], [0.0, -1.0]])
    out = alignment_uniformity(images, texts, alpha=2, t=2)
    assert out["alignment"] == pytest.approx((0.0 + 4.0) / 2)
    # images: one distinct pair, |e1 - e2|² = 2 -> log exp(-4) = -4; texts: |e1 + e2|² = 2 -> -4
    assert out["uniformity_image"] == pytest.approx(-4.0)
    assert out["uniformity_text"] == pytest.approx(-4.0)
    assert out["uniformity"] == pytest.approx(-4.0)
    out = alignment_uniformity(images, texts, alpha=1, t=1)
    assert out["alignment"] == pytest.approx(1.0)
    assert out["uniformity_image"] == pytest.approx(-2.0)


def test_uniformity_matches_wang_isola_reference_code():
    x = torch.nn.functional.normalize(torch.randn(50, 6, dtype=torch.float64), dim=1)
    y = torch.nn.functional.normalize(torch.randn(50, 6, dtype=torch.float64), dim=1)
    reference_uniform = torch.pdist(x, p=2).pow(2).mul(-2).exp().mean().log().item()
    reference_align = (x - y).norm(p=2, dim=1).pow(2).mean().item()
    out = alignment_uniformity(x, y)
    assert out["uniformity_image"] == pytest.approx(reference_uniform, rel=1e-9)
    assert out["alignment"] == pytest.approx(reference_align, rel=1e-9)


def test_alignment_uniformity_needs_matched_pairs():
    with pytest.raises(ValueError, match="matched pairs"):
        alignment_uniformity(np.ones((3, 2)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="alpha and t"):
        alignment_uniformity(np.ones((3, 2)), np.ones((3, 2)), t=0)


# ---------------------------------------------------------------------------------------------- report and CLI
def test_geometry_report_and_pair_similarities():
    from hf_align.functional.geometry import geometry_report, pair_similarities

    x = _rng(10).normal(size=(60, 4))
    matched, shuffled = pair_similarities(x, x)
    assert np.allclose(matched, 1.0) and (shuffled < 1.0 - 1e-9).all()  # random pairs never repeat a matched pair
    report = geometry_report(x, x, max_samples=30)
    assert report["modality_gap"] == pytest.approx(0.0, abs=1e-12)
    assert report["sample_w2"] == pytest.approx(0.0, abs=1e-6)
    assert report["alignment"] == pytest.approx(0.0, abs=1e-12)
    assert report["pair_similarity"]["matched_beats_random"] == 1.0
    assert report["sample_w2_rows"] == 30
    json_ready = __import__("json").dumps(report)
    assert "gaussian_w2" in json_ready


def test_analyze_command_before_and_after(tmp_path):
    import json

    from hf_align import AlignerModel
    from hf_align.commands.cli import main
    from hf_align.features import features_from_tensors
    from hf_align.testing import make_paired_task

    task = make_paired_task(n=200, vision_dim=24, text_dim=24, seed=0)
    features_from_tensors(task.vision, task.text).save_to_disk(str(tmp_path / "cache"))
    model = AlignerModel.from_feature_dims(24, 24, method="linear", projection_dim=8, similarity="bilinear")
    model.save_pretrained(str(tmp_path / "aligner"))
    out = tmp_path / "report"
    assert (
        main(
            [
                "analyze",
                "--features",
                str(tmp_path / "cache"),
                "--model",
                str(tmp_path / "aligner"),
                "--output_dir",
                str(out),
                "--max_samples",
                "100",
            ]
        )
        == 0
    )
    report = json.loads((out / "analysis.json").read_text())
    before, after = report["stages"]["before"], report["stages"]["after"]
    assert before["applicable"] and before["dim"] == 24 and before["vision_layer"] == 2
    assert after["applicable"] and after["dim"] == 8 and after["similarity"] == "bilinear"
    assert report["n_rows_analysed"] == 100
    for stage in ("before", "after"):
        assert (out / f"projection_{stage}.png").stat().st_size > 0
        assert (out / f"similarity_hist_{stage}.png").stat().st_size > 0
        assert 0 <= report["stages"][stage]["modality_gap"] <= 2


def test_analyze_before_is_not_applicable_for_different_widths(tmp_path):
    from hf_align.experiments.geometry import analyze
    from hf_align.features import features_from_tensors
    from hf_align.testing import make_paired_task

    task = make_paired_task(n=80, vision_dim=16, text_dim=12, seed=0)
    report = analyze(features_from_tensors(task.vision, task.text), str(tmp_path), plots=False)
    assert report["stages"]["before"]["applicable"] is False
    assert "different widths (vision 16, text 12)" in report["stages"]["before"]["reason"]
    assert report["stages"]["after"] == {"applicable": False, "reason": "no aligner given (--model)"}
    with pytest.raises(ValueError, match="not in the cache"):
        analyze(features_from_tensors(task.vision, task.text), str(tmp_path), vision_layer=7, plots=False)
