"""Similarity heads: hand-computed values, chunked evaluation, the registry, config-time compatibility checks."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_align import AlignerModel
from hf_align.similarity import SIMILARITIES, SimilarityHead, build_similarity, check_similarity, register_similarity

HEADS = SIMILARITIES.names()
X = torch.tensor([[3.0, 4.0]])
Y = torch.tensor([[4.0, 3.0]])


def test_registry_holds_the_paper_metrics_and_the_learned_heads():
    assert HEADS == ["bilinear", "chi_square", "cosine", "dot", "euclidean", "manhattan", "mlp"]
    assert all(SIMILARITIES[name].similarity_name == name for name in HEADS)
    with pytest.raises(ValueError, match=r"unknown similarity 'cos'; registered similarities: \['bilinear', .*'mlp'\]"):
        build_similarity("cos", 4)
    with pytest.raises(TypeError, match="unknown similarity_config key.*'hiden'"):
        build_similarity("mlp", 4, hiden=3)


def test_register_similarity_refuses_a_taken_name_and_a_non_module():
    class Cosine2(SimilarityHead):
        pass

    taken = r"'cosine' is already registered to hf_align\.similarity\.inner_product\.CosineSimilarity; cannot register .*Cosine2 under"
    with pytest.raises(ValueError, match=taken):
        register_similarity("cosine")(Cosine2)
    with pytest.raises(ValueError, match=r"similarity 'plain' must be a subclass of Module, got <function"):
        register_similarity("plain")(lambda x, y: x @ y.t())
    assert "plain" not in SIMILARITIES and SIMILARITIES["cosine"].__name__ == "CosineSimilarity"
    assert Cosine2.similarity_name == ""  # a refused class is left as it was


# ---------------------------------------------------------------------------------------------- hand-computed values
@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("cosine", {}, 24 / 25),
        ("dot", {}, 24.0),
        ("euclidean", {}, -math.sqrt(2)),
        ("euclidean", {"scale": 2.0}, -2 * math.sqrt(2)),
        ("manhattan", {}, -2.0),
        # ½ [(3-4)²/(3+4) + (4-3)²/(4+3)] = 1/7
        ("chi_square", {}, -1 / 7),
    ],
)
def test_fixed_metrics_against_hand_computed_values(name, kwargs, expected):
    head = build_similarity(name, 2, **kwargs)
    assert head(X, Y).item() == pytest.approx(expected, rel=1e-6)
    assert head.score_pairs(X, Y).item() == pytest.approx(expected, rel=1e-6)


def test_chi_square_on_signed_embeddings():
    # "abs": ½ Σ (x−y)² / (|x|+|y|): ½ [(2)²/2 + (4)²/4] = 3 for x = (1, −2), y = (−1, 2)
    head = build_similarity("chi_square", 2)
    assert head(torch.tensor([[1.0, -2.0]]), torch.tensor([[-1.0, 2.0]])).item() == pytest.approx(-3.0)
    # zero coordinates in both contribute nothing (no 0/0)
    assert head(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0]])).item() == pytest.approx(0.0, abs=1e-7)
    # "softmax": x -> (½, ½), y -> (¾, ¼) at temperature 0.1: ½ [(¼)²/1.25 + (¼)²/0.75] = 1/15
    head = build_similarity("chi_square", 2, signed="softmax", softmax_temperature=0.1)
    y = torch.tensor([[0.1 * math.log(3.0), 0.0]])
    assert head(torch.zeros(1, 2), y).item() == pytest.approx(-1 / 15, rel=1e-5)
    with pytest.raises(ValueError, match="signed"):
        build_similarity("chi_square", 2, signed="shift")


def test_bilinear_hand_computed_and_identity_start():
    head = build_similarity("bilinear", 2)
    assert head(X, Y).item() == pytest.approx(24.0)  # W = I at the start: the dot product
    with torch.no_grad():
        head.delta.copy_(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    # W = [[1, 1], [0, 1]]: W y = (7, 3), x · W y = 21 + 12
    assert head(X, Y).item() == pytest.approx(33.0)
    assert head.score_pairs(X, Y).item() == pytest.approx(33.0)
    assert torch.equal(head.weight, torch.tensor([[1.0, 1.0], [0.0, 1.0]]))


def test_mlp_hand_computed():
    head = build_similarity("mlp", 2, hidden_dim=2)
    with torch.no_grad():
        head.image_in.weight.copy_(torch.eye(2))
        head.image_in.bias.zero_()
        head.text_in.weight.copy_(-torch.eye(2))
        head.out_weight.copy_(torch.ones(2))
        head.out_bias.fill_(0.5)
    # h = x − y = (−1, 1); GELU(−1) + GELU(1) = −Φ(−1) + Φ(1) = 2Φ(1) − 1; + 0.5
    phi = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    expected = 2 * phi - 1 + 0.5
    assert head(X, Y).item() == pytest.approx(expected, rel=1e-6)
    assert head.score_pairs(X, Y).item() == pytest.approx(expected, rel=1e-6)


def test_mlp_starts_neutral():
    head = build_similarity("mlp", 8)
    scores = head(torch.randn(5, 8), torch.randn(6, 8))
    assert torch.equal(scores, torch.zeros(5, 6))  # zero output layer: InfoNCE starts at log B


# ---------------------------------------------------------------------------------------------- shapes, chunking
@pytest.mark.parametrize("name", HEADS)
def test_pairwise_scores_agree_with_score_pairs(name):
    torch.manual_seed(2)
    head = build_similarity(name, 6)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, y = torch.randn(5, 6), torch.randn(7, 6)
    scores = head(x, y)
    assert scores.shape == (5, 7)
    torch.testing.assert_close(scores[:, :5].diagonal(), head.score_pairs(x, y[:5]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, kwargs", [("manhattan", {}), ("chi_square", {}), ("mlp", {"interaction": True, "num_hidden_layers": 2})]
)
def test_chunked_evaluation_gives_the_same_values_and_gradients(name, kwargs):
    torch.manual_seed(3)
    whole = build_similarity(name, 8, **kwargs)
    for p in whole.parameters():
        torch.nn.init.normal_(p, std=0.3)
    chunked = build_similarity(name, 8, max_chunk_elements=300, **kwargs)  # blocks of a few pairs
    chunked.load_state_dict(whole.state_dict())
    whole, chunked = whole.double(), chunked.double()  # compare in fp64: blockwise matmuls round differently
    grads = []
    for head in (whole, chunked):
        x = torch.randn(9, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True)
        y = torch.randn(11, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
        scores = head(x, y)
        weights = torch.linspace(-1, 1, scores.numel(), dtype=torch.float64).view_as(scores)
        (scores * weights).sum().backward()
        grads.append((scores.detach(), x.grad, y.grad, [p.grad for p in head.parameters()]))
    for a, b in zip(grads[0][:3], grads[1][:3]):
        torch.testing.assert_close(a, b)
    for a, b in zip(grads[0][3], grads[1][3]):
        torch.testing.assert_close(a, b)


def test_mlp_peak_memory_is_bounded_by_the_block_size():
    # 128 x 128 pairs x 64 hidden = 1M activations unchunked; blocks of 2^14 keep every saved tensor small.
    head = build_similarity("mlp", 16, hidden_dim=64, max_chunk_elements=2**14)
    x = torch.randn(128, 16, requires_grad=True)
    y = torch.randn(128, 16, requires_grad=True)
    torch.nn.init.normal_(head.out_weight)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        scores = head(x, y)
    assert scores.shape == (128, 128)
    assert max(saved) <= 128 * 128  # the output, the block inputs: nothing of size Bi·Bt·hidden is kept
    scores.sum().backward()
    assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------------- with the model
def test_head_settings_are_checked_before_any_encoder_is_loaded():
    # from_encoders checks before it loads anything: a nonexistent encoder path is never reached
    with pytest.raises(TypeError, match=r"similarity 'mlp' got unknown similarity_config key\(s\) \['width'\]"):
        AlignerModel.from_encoders(
            "/nonexistent/vision", "/nonexistent/text", similarity="mlp", similarity_config={"width": 3}
        )
    with pytest.raises(ValueError, match=r"unknown similarity 'cosinus'; registered similarities: \[.*'cosine'"):
        AlignerModel.from_encoders("/nonexistent/vision", "/nonexistent/text", similarity="cosinus")
    with pytest.raises(ValueError, match=r"unknown similarity 'wasserstein'"):  # token sets: no method outputs them
        AlignerModel.from_feature_dims(8, 6, similarity="wasserstein")


def test_learned_head_with_a_training_free_method_fails_at_configuration_time():
    frozen = type("FrozenMethod", (), {"method_name": "frozen", "trainable": False})
    with pytest.raises(ValueError, match="training-free"):
        check_similarity("bilinear", frozen)
    assert check_similarity("cosine", frozen).similarity_name == "cosine"
    from hf_align import METHODS

    if "asif" in METHODS:
        with pytest.raises(ValueError, match="similarity 'mlp' has trainable parameters.*'asif' is training-free"):
            AlignerModel.from_feature_dims(8, 6, method="asif", similarity="mlp", num_anchors=4, topk=2)


@pytest.mark.parametrize("name", ["bilinear", "mlp"])
def test_learned_head_trains_with_the_aligner_and_is_saved(name, tmp_path):
    torch.manual_seed(6)
    model = AlignerModel.from_feature_dims(
        8, 6, similarity=name, similarity_config={} if name == "bilinear" else {"hidden_dim": 16}
    )
    params = dict(model.named_parameters())
    head_params = [k for k in params if k.startswith("similarity.")]
    assert head_params and all(params[k].requires_grad for k in head_params)
    x, y = torch.randn(16, 8), torch.randn(16, 6)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    first = None
    for _ in range(15):
        loss = model(vision_features=x, text_features=y, return_loss=True).loss
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first
    assert any(params[k].abs().sum() > 0 for k in head_params)
    model.save_pretrained(tmp_path)
    reloaded = AlignerModel.from_pretrained(tmp_path, load_encoders=False).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(vision_features=x, text_features=y).logits_per_image,
            model(vision_features=x, text_features=y).logits_per_image,
        )
    assert reloaded.config.similarity == name


def test_cosine_unit_norm_path_is_the_dot_product_and_equals_forward_on_unit_rows():
    head = build_similarity("cosine", 5)
    image, text = torch.randn(4, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    # no renormalisation: on arbitrary rows it is the plain dot product (the caller vouches for unit norm)
    torch.testing.assert_close(head.score_unit_norm(image, text), image @ text.t(), rtol=0, atol=0)
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    torch.testing.assert_close(head.score_unit_norm(image, text), head(image, text), rtol=1e-12, atol=1e-12)
    with pytest.raises(
        ValueError, match=r"similarity 'cosine' scores \(B, 5\) embeddings; text_embeds has shape \(3, 4\)"
    ):
        head.score_unit_norm(image, text[:, :4])
    # other heads keep their forward
    euclidean = build_similarity("euclidean", 5)
    torch.testing.assert_close(euclidean.score_unit_norm(image, text), euclidean(image, text), rtol=0, atol=0)
