"""`token_relative`'s batched pooling against the same computation written one sample at a time: CAP (values and
the hand-written gradient), mean pooling and late interaction, on random token batches whose padding holds random
tokens. CPU."""

import pytest
import torch
import torch.nn.functional as F

from hf_align.methods.token_relative import TokenRelativeAligner, TokenRelativeConfig, cross_attention_pool

D_V, D_T, K = 24, 16, 40


def make_aligner(pooling: str = "cap", temperature: float = 0.03, seed: int = 0) -> TokenRelativeAligner:
    torch.manual_seed(seed)
    config = TokenRelativeConfig(num_anchors=K, pool_temperature=temperature, pooling=pooling)
    return TokenRelativeAligner(config, D_V, D_T)


def padded_batch(n: int, length: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, length, dim) tokens and a (n, length) mask with 1..length real tokens per row (sample 0 has 1, sample 1
    has all); the padding holds random tokens of its own (100x larger), so any padding that leaks into a profile
    shows."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (n,), generator=generator)
    lengths[0], lengths[1] = 1, length
    mask = torch.arange(length)[None, :] < lengths[:, None]
    tokens = torch.randn(n, length, dim, generator=generator)
    tokens[~mask] = 100 * torch.randn(int((~mask).sum()), dim, generator=generator)
    return tokens, mask


def per_sample_profiles(tokens, mask, anchors, pooling: str, temperature: float) -> torch.Tensor:
    """The profiles one sample at a time, on its real tokens only (no masking to get wrong): (B, K)."""
    profiles = []
    for sample, real in zip(tokens, mask):
        relative = F.normalize(sample[real], dim=-1) @ F.normalize(anchors, dim=-1).t()  # (T_real, K)
        if pooling == "cap":
            weights = torch.softmax(relative / temperature, dim=0)  # over this sample's tokens, per anchor
            profiles.append((weights * relative).sum(dim=0))
        else:
            profiles.append(relative.mean(dim=0))
    return torch.stack(profiles)


@pytest.mark.parametrize("temperature", [0.02, 0.1, 1.0])
@pytest.mark.parametrize("pooling", ["cap", "mean"])
def test_batched_profiles_equal_the_per_sample_loop(pooling, temperature):
    aligner = make_aligner(pooling, temperature)
    images, image_mask = padded_batch(32, 9, D_V, seed=1)
    texts, text_mask = padded_batch(32, 6, D_T, seed=2)
    with torch.no_grad():
        got_images = aligner.embed_image(images, image_mask)
        got_texts = aligner.embed_text(texts, text_mask)
        expected_images = per_sample_profiles(images, image_mask, aligner.vision_anchors, pooling, temperature)
        expected_texts = per_sample_profiles(texts, text_mask, aligner.text_anchors, pooling, temperature)
    torch.testing.assert_close(got_images, expected_images, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_texts, expected_texts, rtol=0, atol=1e-6)
    # a one-token sample's profile is that token's relative vector, whatever τ is
    single = F.normalize(images[0, 0], dim=0) @ F.normalize(aligner.vision_anchors.detach(), dim=-1).t()
    torch.testing.assert_close(got_images[0], single, rtol=0, atol=1e-6)
    # no mask = every token real: the same as an all-True mask
    with torch.no_grad():
        all_real = torch.ones_like(image_mask)
        torch.testing.assert_close(aligner.embed_image(images), aligner.embed_image(images, all_real))


@pytest.mark.parametrize("pooling, temperature", [("cap", 0.02), ("cap", 0.1), ("cap", 1.0), ("mean", 0.03)])
def test_anchor_gradient_equals_autograd_through_the_per_sample_loop(pooling, temperature):
    """The anchors' gradient (CAP's hand-written backward; mean pooling's mean-then-project) against autograd through
    the loop run in float64, the exact gradient to ~1e-15: the fp32 result is within fp32 rounding (for CAP amplified
    by 1/τ in `(R - p) / τ`)."""
    aligner = make_aligner(pooling, temperature)
    images, image_mask = padded_batch(32, 9, D_V, seed=3)
    weights = torch.randn(32, K, generator=torch.Generator().manual_seed(4))
    (aligner.embed_image(images, image_mask) * weights).sum().backward()
    got = aligner.vision_anchors.grad

    anchors = aligner.vision_anchors.detach().double().requires_grad_()
    reference = per_sample_profiles(images.double(), image_mask, anchors, pooling, temperature)
    (reference * weights.double()).sum().backward()
    expected = anchors.grad.float()
    scale = expected.abs().max().item()
    assert scale > 0.5  # a real gradient, not one that vanishes and passes any tolerance
    amplification = temperature**-0.5 if pooling == "cap" else 1.0
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6 * scale * amplification)
    assert aligner.text_anchors.grad is None  # text anchors took no part


def test_cap_gradient_on_padding_is_zero_and_tokens_get_theirs():
    """The gradient reaches the relative vectors of real tokens only (the tokens' own gradient, for aligners that
    train what feeds them, goes through the same backward)."""
    generator = torch.Generator().manual_seed(5)
    relative = torch.rand(6, 5, 7, generator=generator).mul(2).sub(1).requires_grad_()
    mask = torch.tensor([[True] * n + [False] * (5 - n) for n in (1, 2, 3, 4, 5, 5)])
    weights = torch.randn(6, 7, generator=generator)
    (cross_attention_pool(relative, mask, 0.05) * weights).sum().backward()
    assert torch.all(relative.grad[~mask] == 0)
    # each real token's gradient by hand: α (1 + (R - p) / τ) g, with α the softmax over that sample's real tokens
    for b in range(6):
        real = relative.detach()[b][mask[b]]
        alpha = torch.softmax(real / 0.05, dim=0)
        p = (alpha * real).sum(0)
        expected = alpha * (1 + (real - p) / 0.05) * weights[b]
        torch.testing.assert_close(relative.grad[b][mask[b]], expected, rtol=1e-5, atol=1e-6)


def test_cap_under_bf16_autocast_trains_the_fp32_anchors():
    """Mixed precision (what train() uses on a GPU): the relative vectors come out of a bf16 matmul, CAP's softmax
    runs in fp32, and the fp32 anchors get an fp32 gradient close to the fp32 run's."""
    aligner = make_aligner("cap", 0.1)
    images, image_mask = padded_batch(16, 9, D_V, seed=6)
    weights = torch.randn(16, K, generator=torch.Generator().manual_seed(7))
    (aligner.embed_image(images, image_mask) * weights).sum().backward()
    full = aligner.vision_anchors.grad.clone()
    aligner.vision_anchors.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        profiles = aligner.embed_image(images, image_mask)
        assert profiles.dtype == torch.float32
        (profiles * weights).sum().backward()
    mixed = aligner.vision_anchors.grad
    assert mixed.dtype == torch.float32
    assert (mixed - full).norm() / full.norm() < 0.05


def test_late_interaction_equals_the_per_pair_loop():
    aligner = make_aligner("cap")
    images, image_mask = padded_batch(7, 9, D_V, seed=8)
    texts, text_mask = padded_batch(5, 6, D_T, seed=9)
    vision_anchors = F.normalize(aligner.vision_anchors.detach(), dim=-1)
    text_anchors = F.normalize(aligner.text_anchors.detach(), dim=-1)
    expected = torch.empty(7, 5)
    for i in range(7):
        patches = F.normalize(F.normalize(images[i][image_mask[i]], dim=-1) @ vision_anchors.t(), dim=-1)
        for j in range(5):
            words = F.normalize(F.normalize(texts[j][text_mask[j]], dim=-1) @ text_anchors.t(), dim=-1)
            expected[i, j] = (words @ patches.t()).amax(dim=1).mean()  # per word the best patch, mean over words
    for block in (2**25, 9 * 6, 1):  # one block; one image-caption pair per block; smaller than a pair
        got = aligner.late_interaction_scores(images, texts, image_mask, text_mask, block_elements=block)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
