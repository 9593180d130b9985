"""The trainable adapter of a training method: which layers, what tensors, initialised how, named how.

Methods: the network types' (lib_tune.algos registers them with their TrainMethods: lora, locon = LoRA on
convolutions too, dora = LoRA + weight decomposition, loha, lokr), ti (textual inversion: new token vectors only)
and pivotal (LoRA + new token vectors, saved in one file).

Layers (targets presets), following kohya's module classes translated to the ldm/sgm UNet:
- "attn": q/k/v/out of every transformer block's attn1/attn2 (to_q, to_k, to_v, to_out.0);
- "attn_mlp": + the feed-forward (ff.net.0.proj, ff.net.2) (LyCORIS's recommended attn-mlp);
- "full": every Linear / Conv2d inside the SpatialTransformers (kohya's Transformer2DModel: adds proj_in/out) and,
  for methods that train convolutions (locon, loha, lokr, dora), inside ResBlocks, Downsample and Upsample
  (kohya's C3Lier: 3x3 convs at conv_dim/conv_alpha, Linear and 1x1 convs at dim/alpha). Plain lora skips them,
  as kohya's networks.lora does without conv_dim.
- text encoder (train_text_encoder): attention q/k/v/out and MLP fc1/fc2 of every layer (kohya's CLIPAttention +
  CLIPMLP), whatever the UNet preset; OpenCLIP's packed attention gets all four parts, which the built-in needs.

Names are what kohya writes (lib_tune.layer_names.kohya_keys), so the file works in the webui's built-in Lora and
in kohya tools: SD1/SD2 UNet in diffusers style (`lora_unet_down_blocks_0_attentions_0_...`), falling back to
compvis names (`lora_unet_input_blocks_1_1_...`, which the built-in also reads) where the built-in's SD1 block
arithmetic would not lead back to the layer (UNets without SD1's block layout); SDXL UNet compvis-style; text
encoders `lora_te_` / `lora_te1_` / `lora_te2_` + Hugging Face CLIP names (also for OpenCLIP, as kohya converts
them). Every name is checked by mapping it back through lib_tune.inject (the engine's and the built-in's rules) onto
the very layer (and attention part) it was made for.

Tensors: each network type owns its initial values and its metadata names (lib_tune.algos: TrainMethod,
init_weights, for_training); a method is looked up in the registry, so a new trainable type needs nothing here. All
adapter tensors are float32, drawn from a seeded generator.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Collection, Dict, List, Optional, Sequence, Tuple, Type

import torch

from ..algos import train_method, train_methods
from ..algos.base import NetworkModule, TrainMethod
from ..formats.model import AdapterFile
from ..inject.engine import ActiveEntry, activate
from ..inject.mapping import MappedAdapter, map_adapter, place, weight_of
from ..inject.targets import Targets
from ..layer_names import HF_TE_LAYER as _HF_TE, OPENCLIP_TE_LAYER as _OC_TE, kohya_keys
from .embeddings import TrainableEmbedding

Tensor = torch.Tensor

EMBEDDING_METHODS = ("ti", "pivotal")
#: the network method of each embedding method that trains a network too
_NETWORK_OF = {"pivotal": "lora"}


def _network_methods() -> List[TrainMethod]:
    """The registered types' methods in registry order, DoRA variants after the plain ones."""
    return [m for _, m in sorted(train_methods(), key=lambda cm: cm[1].dora)]


def methods() -> Tuple[str, ...]:
    """Every method: the registered network types', then the embedding ones."""
    return tuple(m.name for m in _network_methods()) + EMBEDDING_METHODS


#: the methods as registered when the trainer loads (the form's and the config's choices)
METHODS = methods()
CONV_METHODS = tuple(m.name for m in _network_methods() if m.conv)
PRESETS = ("attn", "attn_mlp", "full")

_ATTN = re.compile(r"_transformer_blocks_\d+_attn[12]_(to_q|to_k|to_v|to_out_0)$")
_MLP = re.compile(r"_transformer_blocks_\d+_ff_net_(0_proj|2)$")
_TRANSFORMER_CLASSES = ("SpatialTransformer",)
_CONV_CLASSES = ("ResBlock", "Downsample", "Upsample")


@dataclass
class MethodSpec:
    """What network to train (TI vectors come separately, see embeddings.init_embedding). dim/alpha for Linear and
    1x1 conv layers, conv_dim/conv_alpha for kxk convs (default: dim/alpha); lokr_factor: the split of factorised
    types (LoKr, as LyCORIS's `factor`; -1: the most balanced); seed for the initial values."""
    method: str = "lora"
    dim: int = 16
    alpha: float = 8.0
    conv_dim: Optional[int] = None
    conv_alpha: Optional[float] = None
    preset: str = "attn_mlp"
    train_text_encoder: bool = False
    lokr_factor: int = -1
    seed: int = 0


@dataclass(frozen=True)
class Target:
    """One layer (or one packed-attention part) to adapt: its webui layer name, part, weight shape, kohya key."""
    layer: str
    part: Optional[str]
    shape: Tuple[int, ...]
    key: str
    is_te: bool


# ---- layer selection -----------------------------------------------------------------------------------------
def select_targets(targets: Targets, preset: str, text_encoder: bool, conv: bool) -> List[Target]:
    """The layers a method adapts on this model, each with its kohya key (checked to map back)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown targets preset {preset!r}; expected one of {', '.join(PRESETS)}")
    layers: List[str] = []
    for name, module in targets.items():
        if targets.is_te(name) or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if _ATTN.search(name) or (preset != "attn" and _MLP.search(name)):
            layers.append(name)
    if preset == "full":
        layers += _children_of(targets, _TRANSFORMER_CLASSES, conv=True)
        if conv:
            layers += _children_of(targets, _CONV_CLASSES, conv=True)
    seen, out = set(), []
    for name in layers:
        if name not in seen:
            seen.add(name)
            out.append(_unet_target(targets, name))
    if text_encoder:
        out += _te_targets(targets)
    return out


def _children_of(targets: Targets, classes: Sequence[str], conv: bool) -> List[str]:
    out = []
    for name, module in targets.items():
        if targets.is_te(name) or type(module).__name__ not in classes:
            continue
        for cname, child in module.named_modules():
            full = f"{name}_{cname.replace('.', '_')}"
            if cname and full in targets and isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                if isinstance(child, torch.nn.Conv2d) and child.groups != 1:
                    continue
                out.append(full)
    return out


def _unet_target(targets: Targets, layer: str) -> Target:
    w = targets[layer].weight
    key = _first_resolving(targets, kohya_keys(layer, None, targets.architecture), layer, None)
    return Target(layer, None, tuple(w.shape), key, False)


def _te_targets(targets: Targets) -> List[Target]:
    out = []
    for name, module in targets.items():
        if not targets.is_te(name):
            continue
        m = _HF_TE.match(name)
        if m and isinstance(module, torch.nn.Linear):
            out.append(_te_target(targets, name, None))
            continue
        m = _OC_TE.match(name)
        if not m:
            continue
        if m[3] == "attn":
            if not isinstance(module, torch.nn.MultiheadAttention) or module.in_proj_weight is None:
                continue
            out += [_te_target(targets, name, part) for part in ("q", "k", "v", "out")]
        elif isinstance(module, torch.nn.Linear):
            out.append(_te_target(targets, name, None))
    return out


def _te_target(targets: Targets, layer: str, part: Optional[str]) -> Target:
    shape = tuple(weight_of(targets[layer], part).shape)
    key = _first_resolving(targets, kohya_keys(layer, part, targets.architecture), layer, part)
    return Target(layer, part, shape, key, True)


def _first_resolving(targets: Targets, candidates: Sequence[str], layer: str, part: Optional[str]) -> str:
    """The first candidate key that the engine's (and the built-in's) rules lead back to (layer, part)."""
    for key in candidates:
        got, got_part, _ = place(key, targets)
        if (got, got_part) == (layer, part):
            return key
    raise ValueError(f"no kohya name maps back to layer {layer}" + (f" part {part}" if part else "")
                     + f" (tried {', '.join(candidates)})")


# ---- tensors ---------------------------------------------------------------------------------------------------
def network_type(method: str) -> Tuple[Type[NetworkModule], TrainMethod]:
    """The network type that trains `method` (pivotal: its LoRA) and the method, from the algorithm registry."""
    try:
        return train_method(_NETWORK_OF.get(method, method))
    except KeyError:
        raise ValueError(f"method {method!r} has no network module") from None


# ---- the adapter -----------------------------------------------------------------------------------------------
@dataclass(eq=False)
class TrainableAdapter:
    """Adapter modules whose tensors are trainable Parameters, plus TI vectors; what the trainer optimises,
    the injector applies (via `mapped`) and state.py saves."""
    method: str
    architecture: str
    modules: Dict[str, NetworkModule] = field(default_factory=dict)
    te_keys: frozenset = frozenset()
    embeddings: List[TrainableEmbedding] = field(default_factory=list)
    mapped: Optional[MappedAdapter] = None

    @property
    def has_network(self) -> bool:
        return bool(self.modules)

    def param_groups(self, keys: Optional[Collection[str]] = None) -> Dict[str, List[torch.nn.Parameter]]:
        """{"unet": [...], "te": [...], "emb": [...]} (empty lists where nothing trains); `keys`: only those
        modules (the embeddings always)."""
        groups: Dict[str, List[torch.nn.Parameter]] = {"unet": [], "te": [], "emb": []}
        for key, net in self.modules.items():
            if keys is not None and key not in keys:
                continue
            groups["te" if key in self.te_keys else "unet"].extend(
                t for t in net.weights.values() if isinstance(t, torch.nn.Parameter))
        for e in self.embeddings:
            groups["emb"].extend(e.parameters())
        return groups

    def parameters(self) -> List[torch.nn.Parameter]:
        return [p for ps in self.param_groups().values() for p in ps]

    def entries(self, te: float = 1.0, unet: float = 1.0) -> List[ActiveEntry]:
        return activate(self.mapped, te=te, unet=unet) if self.mapped is not None else []

    def tensors(self) -> Dict[str, Tensor]:
        """Every tensor of the file, full precision, in a stable order: `<key>.<param>`, then embeddings
        (bundled for pivotal, standalone for ti)."""
        out: Dict[str, Tensor] = {}
        for key in sorted(self.modules):
            for pname, t in sorted(self.modules[key].weights.items()):
                out[f"{key}.{pname}"] = t.detach()
        for e in self.embeddings:
            out.update(e.file_tensors(bundle=self.method != "ti"))
        return out

    def load_tensors(self, tensors: Dict[str, Tensor]) -> None:
        """Copy saved values (from tensors()) into the live tensors in place (resume)."""
        live = self.tensors()
        missing = [k for k in live if k not in tensors]
        extra = [k for k in tensors if k not in live]
        if missing or extra:
            raise ValueError(f"saved adapter does not match this method: missing {missing[:3]}, extra {extra[:3]}")
        with torch.no_grad():
            for key, t in live.items():
                src = tensors[key]
                if tuple(src.shape) != tuple(t.shape):
                    raise ValueError(f"{key}: saved shape {tuple(src.shape)} != {tuple(t.shape)}")
                t.copy_(src.to(device=t.device, dtype=t.dtype))


def create_adapter(targets: Targets, spec: MethodSpec, embedding: Optional[TrainableEmbedding] = None,
                   device: Optional[torch.device] = None,
                   selected: Optional[Sequence[Tuple[Target, int, float]]] = None) -> TrainableAdapter:
    """Build the trainable adapter of `spec` on the model `targets` was made from. `embedding`: the TI vectors
    (ti / pivotal; see embeddings.init_embedding). `selected`: explicit layers as (target, dim, alpha) instead of
    spec.preset / spec.train_text_encoder (staged plans, stages.resolve_plan); kxk convs still take
    spec.conv_dim / conv_alpha when set."""
    known = methods()
    if spec.method not in known:
        raise ValueError(f"unknown method {spec.method!r}; expected one of {', '.join(known)}")
    if spec.method in EMBEDDING_METHODS and embedding is None:
        raise ValueError(f"method {spec.method} needs an embedding")
    adapter = TrainableAdapter(method=spec.method, architecture=targets.architecture,
                               embeddings=[embedding] if embedding is not None else [])
    if spec.method == "ti":
        _to_device(adapter, device)
        return adapter
    g = torch.Generator().manual_seed(int(spec.seed))
    cls, method = network_type(spec.method)
    te_keys = set()
    if selected is None:
        selected = [(t, spec.dim, spec.alpha) for t in select_targets(targets, spec.preset, spec.train_text_encoder,
                                                                        method.conv)]
    for t, t_dim, t_alpha in selected:
        kxk = len(t.shape) == 4 and t.shape[2:] != (1, 1)
        dim = (spec.conv_dim or t_dim) if kxk else t_dim
        alpha = (spec.conv_alpha if spec.conv_alpha is not None else t_alpha) if kxk else t_alpha
        base = weight_of(targets[t.layer], t.part)
        adapter.modules[t.key] = cls.for_training(method, t.shape, dim, alpha, g, base, spec.lokr_factor)
        if t.is_te:
            te_keys.add(t.key)
    if not adapter.modules:
        raise ValueError(f"preset {spec.preset} selects no layer of this model")
    adapter.te_keys = frozenset(te_keys)
    _to_device(adapter, device)
    file = AdapterFile(path=f"<training {spec.method}>", modules=adapter.modules, architecture=targets.architecture)
    adapter.mapped = map_adapter(file, targets, strict=True)
    if adapter.mapped.unmapped or len(adapter.mapped.entries) != len(adapter.modules):
        raise RuntimeError(f"trained adapter does not map onto its own model: {adapter.mapped.summary()}")
    return adapter


def _to_device(adapter: TrainableAdapter, device: Optional[torch.device]) -> None:
    """Move every tensor (Parameters in place, keeping their identity for the optimizer)."""
    if device is None:
        return
    with torch.no_grad():
        for net in adapter.modules.values():
            for k, t in list(net.weights.items()):
                if isinstance(t, torch.nn.Parameter):
                    t.data = t.data.to(device)
                else:
                    net.weights[k] = t.to(device)
        for e in adapter.embeddings:
            for p in e.parameters():
                p.data = p.data.to(device)
