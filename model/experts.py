"""Expert subsets as first-class objects: take a subset's state, merge it back, prune a model.

Expert state is stacked per layer: `moe.{layer}.{param}` holds the rows of the listed experts in
the order of `moe.{layer}.ids` (global ids). This is what travels between server and clients.
"""

from __future__ import annotations

import torch

from geomoe.model.config import ModelConfig
from geomoe.model.moe_layer import EXPERT_PARAMS, MoEMlp
from geomoe.model.network import GeoMoENet

KeepSet = dict[int, list[int]]  # MoE layer -> global expert ids


def expert_key(layer: int, param: str) -> str:
    return f"moe.{layer}.{param}"


def is_expert_key(key: str) -> bool:
    return key.startswith("moe.")


def local_rows(module: MoEMlp, ids: list[int]) -> torch.Tensor:
    """Row positions of global expert `ids` in a layer; raises if the layer does not hold one."""
    held = module.expert_ids.tolist()
    missing = sorted(set(ids) - set(held))
    if missing:
        raise KeyError(f"experts {missing} are not held by this layer (holds {held})")
    return torch.tensor([held.index(i) for i in ids], dtype=torch.long)


def take_expert_state(model: GeoMoENet, keep: KeepSet | None = None) -> dict[str, torch.Tensor]:
    """Copy of the parameters of the experts in `keep` (all held experts when None)."""
    state: dict[str, torch.Tensor] = {}
    for layer, module in model.moe_layers().items():
        ids = module.expert_ids.tolist() if keep is None else sorted(keep.get(layer, []))
        if not ids:
            continue
        rows = local_rows(module, ids)
        state[expert_key(layer, "ids")] = torch.tensor(ids, dtype=torch.long)
        for param in EXPERT_PARAMS:
            state[expert_key(layer, param)] = getattr(module, param).detach()[rows].clone()
    return state


def merge_expert_state(model: GeoMoENet, state: dict[str, torch.Tensor]) -> None:
    """Write stacked expert rows from `state` into the matching experts of `model`, in place."""
    modules = model.moe_layers()
    for key, ids in state.items():
        if not key.endswith(".ids"):
            continue
        layer = int(key.split(".")[1])
        if layer not in modules:
            raise KeyError(f"expert state names layer {layer}, which is not an MoE layer of this model")
        rows = local_rows(modules[layer], ids.tolist())
        with torch.no_grad():
            for param in EXPERT_PARAMS:
                getattr(modules[layer], param)[rows] = state[expert_key(layer, param)].to(
                    getattr(modules[layer], param).dtype
                )


def shared_state(model: GeoMoENet) -> dict[str, torch.Tensor]:
    """Everything in the model's state that is not a held expert's parameter or the subset bookkeeping."""
    expert_names = {*EXPERT_PARAMS, "expert_ids", "absent_ids", "absent_centroids"}
    moe_prefixes = [name for name, m in model.named_modules() if isinstance(m, MoEMlp)]
    out = {}
    for key, value in model.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in moe_prefixes and leaf in expert_names:
            continue
        out[key] = value
    return out


def global_centroids(module: MoEMlp) -> torch.Tensor:
    """(E_global, C) centroids by global id, from held parameters and the absent buffer."""
    out = torch.empty(module.num_global_experts, module.dim, dtype=module.centroids.dtype)
    out[module.expert_ids] = module.centroids.detach()
    if module.absent_ids.numel():
        out[module.absent_ids] = module.absent_centroids.detach()
    return out


def prune_model(model: GeoMoENet, keep: KeepSet, absent_policy: str | None = None) -> GeoMoENet:
    """A physically smaller model holding only the experts in `keep` (layers absent from `keep`: unchanged).

    The dropped experts' centroids stay as a frozen buffer, so a patch whose expert was kept gets
    exactly the gate and output it had in the full model.
    """
    cfg_dict = model.cfg.to_dict()
    held = {layer: m.expert_ids.tolist() for layer, m in model.moe_layers().items()}
    new_ids = {layer: sorted(keep.get(layer, held[layer])) for layer in held}
    for layer, ids in new_ids.items():
        if not set(ids) <= set(held[layer]):
            raise KeyError(f"cannot keep experts {sorted(set(ids) - set(held[layer]))} of layer {layer}: not held")
    cfg_dict["expert_ids"] = new_ids
    if absent_policy is not None:
        cfg_dict["absent_policy"] = absent_policy
    pruned = GeoMoENet(ModelConfig.from_dict(cfg_dict))
    pruned.load_state_dict(shared_state(model), strict=False)
    merge_expert_state(pruned, take_expert_state(model, new_ids))
    for layer, module in pruned.moe_layers().items():
        source = model.moe_layers()[layer]
        with torch.no_grad():
            module.absent_centroids.copy_(global_centroids(source)[module.absent_ids])
    return pruned
