"""Dense -> MoE conversion (Mensah et al. 2024, Sec. 3.2; 2025 for imbalanced data).

1. Collect the dense model's pre-MLP patch embeddings on sample images at several scales.
2. Algorithm 1: per class, the K patches most similar to each other, refined in T steps.
3. Fit the router's min-max scaler on that sample; Ward (or k-means) clustering -> E centroids (and, for a
   low-rank gate, the projection that best keeps them).
4. MoEfication: each expert keeps the d_e dense hidden units most active on its patches; its input
   affine starts from the dense norm; X_corr is the dense MLP output at its centroid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from geomoe.model.compute import model_device, on_device
from geomoe.model.config import CLUSTERINGS, Clustering, ModelConfig
from geomoe.model.moe_layer import low_rank_gate
from geomoe.model.network import GeoMoENet, transformer_layers


@dataclass
class ConversionConfig:
    """How to turn a trained dense model into experts."""

    __pydantic_config__ = {"extra": "forbid"}  # unknown keys are refused when pydantic builds it from a file

    top_k: int = 128  # representative patches per class (K)
    refine_steps: int = 5  # refinement steps of Algorithm 1 (T; 100 for imbalanced data)
    scales: tuple[int, ...] = (48, 64, 80)  # image sides the sample is resized to (paper: 160..320 for 256 px)
    clustering: Clustering = "ward"  # "ward" (paper) or "kmeans"
    min_images_per_class: int = 0  # resample rare classes up to this many images (10 for iWildcam)
    batch_size: int = 64  # images per forward pass while collecting

    def __post_init__(self) -> None:
        if self.clustering not in CLUSTERINGS:
            raise ValueError(f"clustering {self.clustering!r} is not one of {CLUSTERINGS}")


@dataclass
class LayerSample:
    """Pre-MLP patches of one layer: normalised tokens (M, P, C) and the class of their image (M,)."""

    tokens: torch.Tensor
    labels: torch.Tensor

    @property
    def embeddings(self) -> torch.Tensor:
        return self.tokens.mean(dim=1)  # mean over the P pixels of a patch: (M, C)


def resample_classes(labels: np.ndarray, minimum: int, seed: int) -> np.ndarray:
    """Indices where every class has at least `minimum` images (rare ones repeated)."""
    rng = np.random.default_rng(seed)
    indices = [np.arange(labels.size)]
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if members.size < minimum:
            indices.append(rng.choice(members, minimum - members.size, replace=True))
    return np.concatenate(indices)


@torch.no_grad()
def collect_patches(
    dense: GeoMoENet, images: torch.Tensor, labels: torch.Tensor, cfg: ConversionConfig, layers: tuple[int, ...]
) -> dict[int, LayerSample]:
    """Pre-MLP patches of every layer in `layers`, over all scales."""
    dense.eval()
    device = model_device(dense)
    tokens: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    patch_labels: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for side in cfg.scales:
        for start in range(0, len(images), cfg.batch_size):
            batch = images[start : start + cfg.batch_size].to(device)
            if batch.shape[-1] != side:
                batch = F.interpolate(batch, size=(side, side), mode="bilinear", align_corners=False)
            _, pre_mlp = dense.forward_with_pre_mlp(batch)
            for layer in layers:
                x = pre_mlp[layer]  # (B, C, P, N)
                B, C, P, N = x.shape
                tokens[layer].append(x.permute(0, 3, 2, 1).reshape(B * N, P, C).cpu())  # [B, C, P, N] --> [B*N, P, C]
                patch_labels[layer].append(labels[start : start + cfg.batch_size].repeat_interleave(N))
    return {layer: LayerSample(torch.cat(tokens[layer]), torch.cat(patch_labels[layer])) for layer in layers}


def representative_patches(embeddings: torch.Tensor, k: int, steps: int) -> torch.Tensor:
    """Algorithm 1: indices of the k embeddings most similar to each other, refined `steps` times."""
    k = min(k, len(embeddings))
    unit = F.normalize(embeddings, dim=-1)
    centre = unit.mean(dim=0)
    chosen = torch.arange(len(embeddings))
    for _ in range(max(steps, 1)):
        chosen = (unit @ F.normalize(centre, dim=0)).topk(k).indices
        centre = unit[chosen].mean(dim=0)
    return chosen


def cluster_centroids(points: np.ndarray, num_clusters: int, method: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (E, C) and cluster of each point."""
    # Imported here, not above: scikit-learn takes ~1 s to load, and every client process imports this module (the
    # run config holds ConversionConfig) without ever clustering.
    from sklearn.cluster import AgglomerativeClustering, KMeans

    if len(points) < num_clusters:
        raise ValueError(f"only {len(points)} representative patches for {num_clusters} experts: add sample images")
    if method == "ward":
        assignment = AgglomerativeClustering(n_clusters=num_clusters, linkage="ward").fit_predict(points)
    else:
        assignment = KMeans(n_clusters=num_clusters, n_init=4, random_state=seed).fit_predict(points)
    centroids = np.stack([points[assignment == e].mean(axis=0) for e in range(num_clusters)])
    return centroids, assignment


def convert_to_moe(
    dense: GeoMoENet,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: ConversionConfig,
    target: ModelConfig,
    seed: int,
    device: torch.device = torch.device("cpu"),
) -> GeoMoENet:
    """A MoE model of shape `target` (its MoE layers, experts and d_e) initialised from `dense` (a CPU model) on
    sample `images` (N, 3, H, W) with `labels` (N,); `seed` seeds resampling and k-means. The sample's forward
    passes run on `device`; clustering and MoEfication on the CPU."""
    if cfg.min_images_per_class:
        keep = torch.from_numpy(resample_classes(labels.numpy(), cfg.min_images_per_class, seed))
        images, labels = images[keep], labels[keep]
    with on_device(device, dense):
        samples = collect_patches(dense, images, labels, cfg, target.moe_layers)
    moe = GeoMoENet(ModelConfig.from_dict({**target.to_dict(), "num_classes": dense.cfg.num_classes, "expert_ids": {}}))
    missing, unexpected = moe.load_state_dict(dense.state_dict(), strict=False)
    leftover = [k for k in unexpected if not any(f".{s}." in k for s in ("norm2", "mlp"))]
    if leftover or any(".mlp." not in k for k in missing):
        raise RuntimeError(f"dense and MoE models disagree beyond the MLPs: {leftover or missing}")
    dense_layers = transformer_layers(dense.backbone)
    for layer, module in moe.moe_layers().items():
        init_layer(module, dense_layers[layer], samples[layer], cfg, seed)
    return moe


@torch.no_grad()
def init_layer(module, dense_block, sample: LayerSample, cfg: ConversionConfig, seed: int) -> None:
    """Router and experts of one MoE layer from the dense block's norm2 + mlp."""
    embeddings = sample.embeddings
    chosen = torch.cat(
        [
            torch.nonzero(sample.labels == cls).squeeze(1)[
                representative_patches(embeddings[sample.labels == cls], cfg.top_k, cfg.refine_steps)
            ]
            for cls in sample.labels.unique()
        ]
    )
    lo, hi = embeddings[chosen].min(dim=0).values, embeddings[chosen].max(dim=0).values
    module.scale_min.copy_(lo)
    module.scale_max.copy_(hi)
    scaled = module.scale(embeddings[chosen]).numpy()
    centroids, assignment = cluster_centroids(scaled, module.num_held, cfg.clustering, seed)
    module.centroids.copy_(torch.from_numpy(centroids))
    if module.gate_proj is not None:
        module.gate_proj.copy_(low_rank_gate(module.centroids, module.gate_proj.shape[1]))
    # Every collected patch goes where the router will send it; MoEfication uses those tokens.
    routed = module.route(embeddings[None]).choice
    routed = routed[0]
    norm_w, norm_b = dense_block.norm2.weight, dense_block.norm2.bias
    fc1 = dense_block.mlp.fc1.weight.flatten(1)  # (2C, C)
    fc2 = dense_block.mlp.fc2.weight.flatten(1)  # (C, 2C)
    act = dense_block.mlp.act
    for e in range(module.num_held):
        members = torch.nonzero(routed == e).squeeze(1)
        if members.numel() == 0:
            members = chosen[torch.from_numpy(assignment == e)]
        tokens = sample.tokens[members].reshape(-1, module.dim) * norm_w + norm_b
        activity = act(tokens @ fc1.T + dense_block.mlp.fc1.bias).mean(dim=0)  # (2C,)
        units = activity.topk(module.expert_hidden).indices
        module.norm_weight[e] = norm_w
        module.norm_bias[e] = norm_b
        module.w1[e] = fc1[units].T
        module.b1[e] = dense_block.mlp.fc1.bias[units]
        module.w2[e] = fc2[:, units].T
        module.b2[e] = dense_block.mlp.fc2.bias
        centre = module.centroids[e] * (hi - lo).clamp_min(1e-6) + lo  # scaling reversed
        module.x_corr[e] = dense_block.mlp((centre * norm_w + norm_b)[None, :, None, None])[0, :, 0, 0]
