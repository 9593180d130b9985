"""The layer names adapters are matched against: the same names the webui's built-in Lora assigns
(extensions-builtin/Lora/networks.py assign_network_names_to_compvis_modules), so that tools written against
`network_layer_name` (block weights, analyzers) see the same strings.

Works on a raw ldm/sgm model and on the webui's hijacked one: the hijack wraps text encoders in objects with a
`.wrapped` attribute, which is unwrapped here, so both give the same names.
"""
from __future__ import annotations

from typing import FrozenSet, Iterable, Tuple

import torch


class Targets(dict):
    """layer name -> module, plus what was learned about the model while naming it.

    architecture: "sd1" | "sd2" | "sdxl".
    te_names: the names that belong to a text encoder (everything else is the UNet).
    """

    def __init__(self, items: Iterable[Tuple[str, torch.nn.Module]], architecture: str, te_names: FrozenSet[str]):
        super().__init__(items)
        self.architecture = architecture
        self.te_names = te_names

    def is_te(self, name: str) -> bool:
        return name in self.te_names


def unwrap(m):
    """The text encoder inside the webui's hijack wrapper (the object itself when it is not wrapped)."""
    return getattr(m, "wrapped", m)


def _named(prefix: str, module: torch.nn.Module):
    for name, sub in module.named_modules():
        if not name and not prefix:  # "" (the built-in maps it to the UNet's root): never a layer; "0_" is kept
            continue
        yield prefix + name.replace(".", "_"), sub


def find_targets(sd_model) -> Targets:
    """Name every text-encoder and UNet module of `sd_model` as the built-in Lora does.

    SDXL (has `conditioner`): `f"{i}_{name}"` for each text embedder i. The built-in only names embedders the
    hijack wrapped (the CLIP ones); on a raw sgm model nothing is wrapped, so an embedder counts when it has
    `.wrapped` or owns parameters (the timestep/size embedders own none). SD1/SD2: `cond_stage_model`
    (unwrapped) with no prefix. UNet: `sd_model.model.named_modules()` -> `diffusion_model_...`.
    """
    te = []
    conditioner = getattr(sd_model, "conditioner", None)
    if conditioner is not None:
        for i, embedder in enumerate(conditioner.embedders):
            if not hasattr(embedder, "wrapped") and next(embedder.parameters(), None) is None:
                continue
            te.extend(_named(f"{i}_", unwrap(embedder)))
    else:
        cond = getattr(sd_model, "cond_stage_model", None)
        if cond is not None:
            te.extend(_named("", unwrap(cond)))
    unet = list(_named("", sd_model.model))

    te_names = frozenset(n for n, _ in te)
    if conditioner is not None:
        arch = "sdxl"
    elif "model_transformer_resblocks" in te_names:  # OpenCLIP-H, the built-in's SD2 test (networks.py L169)
        arch = "sd2"
    else:
        arch = "sd1"
    return Targets(te + unet, arch, te_names)
