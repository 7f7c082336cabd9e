"""The synthetic paired task every method comparison, data-efficiency curve and most tests run on.

`make_paired_task`: a limited-data paired task with cluster structure seen through two different non-linear
"encoders", several layers of which only some carry the shared structure, optionally as token sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PairedTask:
    """A synthetic paired dataset. Layer features are dicts `layer -> tensor`.

    vision / text: pooled features per layer, (n, d_v) / (n, d_t).
    vision_tokens / text_tokens: token features per layer, (n, T, d) (text: padded) when requested.
    text_mask: (n, T_text) bool mask of real text tokens.
    labels: (n,) cluster id of each pair. shared_layers: the (vision, text) layer pair that carries the shared latent.
    """

    vision: dict[int, torch.Tensor]
    text: dict[int, torch.Tensor]
    labels: torch.Tensor
    centers: torch.Tensor
    shared_layers: tuple[int, int]
    vision_tokens: dict[int, torch.Tensor] = field(default_factory=dict)
    text_tokens: dict[int, torch.Tensor] = field(default_factory=dict)
    text_mask: torch.Tensor | None = None
    patch_labels: torch.Tensor | None = None

    def to_features(self, with_labels: bool = True):
        """This task as a feature cache (`datasets.Dataset`, see `hf_align.features`), one image per pair."""
        from ..features import features_from_tensors

        return features_from_tensors(
            self.vision,
            self.text,
            vision_tokens=self.vision_tokens or None,
            text_tokens=self.text_tokens or None,
            text_mask=self.text_mask,
            extra_columns={"label": self.labels} if with_labels else None,
        )

    def split(self, n_train: int) -> tuple[PairedTask, PairedTask]:
        """First `n_train` pairs and the rest, as two tasks (pairs are already in random order)."""
        return self._take(slice(0, n_train)), self._take(slice(n_train, None))

    def _take(self, index: slice) -> PairedTask:
        pick = lambda d: {k: v[index] for k, v in d.items()}  # noqa: E731
        return PairedTask(
            vision=pick(self.vision),
            text=pick(self.text),
            labels=self.labels[index],
            centers=self.centers,
            shared_layers=self.shared_layers,
            vision_tokens=pick(self.vision_tokens),
            text_tokens=pick(self.text_tokens),
            text_mask=None if self.text_mask is None else self.text_mask[index],
            patch_labels=None if self.patch_labels is None else self.patch_labels[index],
        )


def _random_encoder(latent_dim: int, out_dim: int, generator: torch.Generator):
    """A fixed random two-layer non-linear map standing in for one frozen encoder layer."""
    w1 = torch.randn(latent_dim, 2 * out_dim, generator=generator) / latent_dim**0.5
    w2 = torch.randn(2 * out_dim, out_dim, generator=generator) / (2 * out_dim) ** 0.5
    return lambda z: torch.tanh(z @ w1) @ w2


def make_paired_task(
    n: int = 2000,
    n_clusters: int = 10,
    latent_dim: int = 16,
    vision_dim: int = 64,
    text_dim: int = 48,
    n_vision_layers: int = 3,
    n_text_layers: int = 3,
    shared_layers: tuple[int, int] = (-1, -1),
    cluster_std: float = 0.35,
    pair_noise: float = 0.1,
    feature_noise: float = 0.05,
    tokens: bool = False,
    n_patches: int = 16,
    max_text_tokens: int = 8,
    seed: int = 0,
) -> PairedTask:
    """Sample `n` image–text pairs sharing a clustered latent, seen through two different random encoders.

    Each pair has a latent `z = center[label] + cluster_std·ε`; the image sees `z + pair_noise·ε_v`, the text
    `z + pair_noise·ε_t`. Only the layer pair `shared_layers` (indices into the `n_*_layers` hidden states, negative
    allowed) encodes that latent; every other layer encodes an independent nuisance latent, so its cross-modal
    similarity is at chance. With `tokens=True` each modality also gets token sequences at every layer: every token is
    the encoder applied to the sample's latent (or, for a patch planted with another cluster, that cluster's centre)
    plus token noise; `patch_labels` (n, n_patches) records the cluster of each patch.
    """
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_clusters, latent_dim, generator=g) * 1.5
    labels = torch.randint(0, n_clusters, (n,), generator=g)
    z = centers[labels] + cluster_std * torch.randn(n, latent_dim, generator=g)
    z_v = z + pair_noise * torch.randn(n, latent_dim, generator=g)
    z_t = z + pair_noise * torch.randn(n, latent_dim, generator=g)
    shared_v = shared_layers[0] % n_vision_layers
    shared_t = shared_layers[1] % n_text_layers

    def layers(count, dim, shared_index, latent):
        out, maps = {}, {}
        for layer in range(count):
            encoder = _random_encoder(latent_dim, dim, g)
            source = latent if layer == shared_index else torch.randn(n, latent_dim, generator=g)
            out[layer] = encoder(source) + feature_noise * torch.randn(n, dim, generator=g)
            maps[layer] = (encoder, source)
        return out, maps

    vision, vision_maps = layers(n_vision_layers, vision_dim, shared_v, z_v)
    text, text_maps = layers(n_text_layers, text_dim, shared_t, z_t)
    task = PairedTask(vision, text, labels, centers, (shared_v, shared_t))
    if tokens:
        _add_tokens(task, vision_maps, text_maps, centers, n_patches, max_text_tokens, g)
    return task


def _add_tokens(task, vision_maps, text_maps, centers, n_patches, max_text_tokens, g) -> None:
    n, latent_dim = task.labels.shape[0], centers.shape[1]
    # Each image: half of its patches show its own cluster, the rest a second (planted) cluster.
    other = torch.randint(0, centers.shape[0], (n,), generator=g)
    planted = torch.rand(n, n_patches, generator=g) < 0.5
    task.patch_labels = torch.where(planted, other[:, None], task.labels[:, None])
    lengths = torch.randint(2, max_text_tokens + 1, (n,), generator=g)
    task.text_mask = torch.arange(max_text_tokens)[None, :] < lengths[:, None]
    for layer, (encoder, source) in vision_maps.items():
        patch_latent = source[:, None, :].expand(n, n_patches, latent_dim).clone()
        if layer == task.shared_layers[0]:
            patch_latent[planted] = centers[other][:, None, :].expand(n, n_patches, latent_dim)[planted]
        noise = 0.2 * torch.randn(n, n_patches, latent_dim, generator=g)
        task.vision_tokens[layer] = encoder(patch_latent + noise)
    for layer, (encoder, source) in text_maps.items():
        noise = 0.2 * torch.randn(n, max_text_tokens, latent_dim, generator=g)
        tokens = encoder(source[:, None, :] + noise)
        task.text_tokens[layer] = tokens * task.text_mask[..., None]
