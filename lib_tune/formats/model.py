"""The one in-memory adapter model every reader produces and every consumer (mapping, injection, tools,
trainer) uses."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from ..algos.base import NetworkModule


@dataclass
class Embedding:
    """A textual-inversion embedding: one [n_vectors, dim] tensor per text encoder.

    vectors keys: "clip_l" (SD1's CLIP-L, SDXL's first encoder), "clip_g" (SDXL's OpenCLIP-G),
    or "clip_h" (SD2's OpenCLIP-H). A single-encoder file read before the model is known uses "emb"."""
    name: str
    vectors: Dict[str, torch.Tensor]
    step: Optional[int] = None
    source: str = ""

    @property
    def n_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]


@dataclass
class AdapterFile:
    """One adapter file.

    modules: canonical module key -> NetworkModule. Canonical keys are kohya-style: a prefix naming the part of the
    model (`lora_unet_`, `lora_te_`, `lora_te1_`, `lora_te2_`) followed by the target's path with dots as
    underscores, either the diffusers-style names kohya writes for SD1/SD2 (`down_blocks_0_attentions_0_...`) or
    ldm/sgm names (`input_blocks_4_1_...`). Readers of other layouts (diffusers/PEFT, ComfyUI, lycoris_) translate
    their names into this form so that mapping (lib_tune.inject) knows one convention.
    """
    path: str
    modules: Dict[str, NetworkModule] = field(default_factory=dict)
    embeddings: Dict[str, Embedding] = field(default_factory=dict)
    metadata: Dict[str, str] = field(default_factory=dict)
    #: keys the reader could not place (file key names), reported to the user
    unplaced: List[str] = field(default_factory=list)
    #: one line per unplaced key: "<key>: <why>"
    notes: List[str] = field(default_factory=list)
    #: "sd1" | "sd2" | "sdxl" | None, guessed from keys and metadata
    architecture: Optional[str] = None

    @property
    def kinds(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for m in self.modules.values():
            out[m.kind] = out.get(m.kind, 0) + 1
        return out


class AdapterFormatError(ValueError):
    """A file that cannot be read as an adapter; the message names the file and why."""
