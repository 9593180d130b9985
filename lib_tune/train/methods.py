"""The trainable adapter of a training method: which layers, what tensors, initialised how, named how.

Methods: lora, locon (LoRA on convolutions too), loha, lokr, dora (LoRA + weight decomposition), ti (textual
inversion: new token vectors only) and pivotal (LoRA + new token vectors, saved in one file).

Layers (targets presets), following kohya's module classes translated to the ldm/sgm UNet:
- "attn": q/k/v/out of every transformer block's attn1/attn2 (to_q, to_k, to_v, to_out.0);
- "attn_mlp": + the feed-forward (ff.net.0.proj, ff.net.2) (LyCORIS's recommended attn-mlp);
- "full": every Linear / Conv2d inside the SpatialTransformers (kohya's Transformer2DModel: adds proj_in/out) and,
  for methods that train convolutions (locon, loha, lokr, dora), inside ResBlocks, Downsample and Upsample
  (kohya's C3Lier: 3x3 convs at conv_dim/conv_alpha, Linear and 1x1 convs at dim/alpha). Plain lora skips them,
  as kohya's networks.lora does without conv_dim.
- text encoder (train_text_encoder): attention q/k/v/out and MLP fc1/fc2 of every layer (kohya's CLIPAttention +
  CLIPMLP), whatever the UNet preset; OpenCLIP's packed attention gets all four parts, which the built-in needs.

Names are what kohya writes, so the file works in the webui's built-in Lora and in kohya tools: SD1/SD2 UNet in
diffusers style (`lora_unet_down_blocks_0_attentions_0_...`), falling back to compvis names
(`lora_unet_input_blocks_1_1_...`, which the built-in also reads) where the built-in's SD1 block arithmetic would
not lead back to the layer (UNets without SD1's block layout); SDXL UNet compvis-style; text encoders
`lora_te_` / `lora_te1_` / `lora_te2_` + Hugging Face CLIP names (also for OpenCLIP, as kohya converts them).
Every name is checked by mapping it back through lib_tune.inject (the engine's and the built-in's rules) onto
the very layer (and attention part) it was made for.

Initialisation: LoRA like kohya (down kaiming-uniform a=sqrt(5), up zeros: the initial delta is 0); LoHa and LoKr
like LyCORIS (LoHa w1_b ~ N(0,1), w1_a ~ N(0,0.1^2), w2_b ~ N(0,1), w2_a = 0; LoKr factor split by LyCORIS's
factorization, w1 kaiming, w2 (or w2_b) zeros); DoRA as the webui v1.10.1 reads it: dora_scale [1, in, ...]
holding the per-input-channel norm of the base weight, so the initial delta is exactly 0. All adapter tensors
are float32, drawn from a seeded generator.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Collection, Dict, List, Optional, Sequence, Tuple

import torch

from ..algos.base import NetworkModule
from ..algos.loha import LohaModule
from ..algos.lokr import LokrModule
from ..algos.lora import LoraModule
from ..formats.model import AdapterFile
from ..inject.engine import ActiveEntry, activate
from ..inject.mapping import MappedAdapter, map_adapter
from ..inject.names import resolve
from ..inject.targets import Targets
from .embeddings import TrainableEmbedding

Tensor = torch.Tensor

METHODS = ("lora", "locon", "loha", "lokr", "dora", "ti", "pivotal")
NETWORK_METHODS = ("lora", "locon", "loha", "lokr", "dora", "pivotal")
EMBEDDING_METHODS = ("ti", "pivotal")
CONV_METHODS = ("locon", "loha", "lokr", "dora")
PRESETS = ("attn", "attn_mlp", "full")

_ATTN = re.compile(r"_transformer_blocks_\d+_attn[12]_(to_q|to_k|to_v|to_out_0)$")
_MLP = re.compile(r"_transformer_blocks_\d+_ff_net_(0_proj|2)$")
_TRANSFORMER_CLASSES = ("SpatialTransformer",)
_CONV_CLASSES = ("ResBlock", "Downsample", "Upsample")
_HF_TE = re.compile(r"^(0_)?transformer_text_model_encoder_layers_(\d+)_(self_attn_(q|k|v|out)_proj|mlp_fc[12])$")
_OC_TE = re.compile(r"^(1_)?model_transformer_resblocks_(\d+)_(attn|mlp_c_fc|mlp_c_proj)$")
_RESNET_INV = {"in_layers_2": "conv1", "out_layers_3": "conv2", "in_layers_0": "norm1", "out_layers_0": "norm2",
               "emb_layers_1": "time_emb_proj", "skip_connection": "conv_shortcut"}


@dataclass
class MethodSpec:
    """What network to train (TI vectors come separately, see embeddings.init_embedding). dim/alpha for Linear and
    1x1 conv layers, conv_dim/conv_alpha for kxk convs (default: dim/alpha); lokr_factor as LyCORIS (-1: the most
    balanced split); seed for the initial values."""
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
    path = layer[len("diffusion_model_"):]
    candidates = []
    if targets.architecture in ("sd1", "sd2"):
        d = diffusers_name(path, targets[layer])
        if d is not None:
            candidates.append("lora_unet_" + d)
    candidates.append("lora_unet_" + path)
    return Target(layer, None, tuple(w.shape), _first_resolving(targets, candidates, layer, None), False)


def diffusers_name(path: str, module: torch.nn.Module) -> Optional[str]:
    """The diffusers-style name kohya writes for an SD1/SD2 UNet layer path (ldm names, underscores), i.e. the
    inverse of the built-in's convert_diffusers_name_to_compvis; None for layers without one."""
    m = re.match(r"input_blocks_(\d+)_(\d+)_(.+)$", path)
    if m:
        i, j, rest = int(m[1]), int(m[2]), m[3]
        if i == 0:
            return None
        level, idx = (i - 1) // 3, (i - 1) % 3
        if idx == 2:
            return f"down_blocks_{level}_downsamplers_0_conv" if j == 0 and rest == "op" else None
        return _block("down_blocks", level, idx, j, rest)
    m = re.match(r"middle_block_(\d+)_(.+)$", path)
    if m:
        j, rest = int(m[1]), m[2]
        if j == 1:
            return f"mid_block_attentions_0_{rest}"
        return f"mid_block_resnets_{j // 2}_{_RESNET_INV.get(rest, rest)}"
    m = re.match(r"output_blocks_(\d+)_(\d+)_(.+)$", path)
    if m:
        i, j, rest = int(m[1]), int(m[2]), m[3]
        level, idx = i // 3, i % 3
        if rest == "conv" and isinstance(module, torch.nn.Conv2d) and j > 0:
            return f"up_blocks_{level}_upsamplers_0_conv"
        return _block("up_blocks", level, idx, j, rest)
    return None


def _block(group: str, level: int, idx: int, j: int, rest: str) -> Optional[str]:
    if j == 0:
        return f"{group}_{level}_resnets_{idx}_{_RESNET_INV.get(rest, rest)}"
    if j == 1:
        return f"{group}_{level}_attentions_{idx}_{rest}"
    return None


def _te_targets(targets: Targets) -> List[Target]:
    out = []
    for name, module in targets.items():
        if not targets.is_te(name):
            continue
        m = _HF_TE.match(name)
        if m and isinstance(module, torch.nn.Linear):
            prefix = "lora_te1_" if m[1] else "lora_te_"
            key = prefix + name[len(m[1] or ""):][len("transformer_"):]
            out.append(Target(name, None, tuple(module.weight.shape), _first_resolving(targets, [key], name, None),
                              True))
            continue
        m = _OC_TE.match(name)
        if not m:
            continue
        prefix = "lora_te2_" if m[1] else "lora_te_"
        base = f"{prefix}text_model_encoder_layers_{m[2]}_"
        if m[3] == "attn":
            if not isinstance(module, torch.nn.MultiheadAttention) or module.in_proj_weight is None:
                continue
            e = module.embed_dim
            for part in ("q", "k", "v"):
                key = _first_resolving(targets, [f"{base}self_attn_{part}_proj"], name, part)
                out.append(Target(name, part, (e, e), key, True))
            key = _first_resolving(targets, [f"{base}self_attn_out_proj"], name, "out")
            out.append(Target(name, "out", tuple(module.out_proj.weight.shape), key, True))
        elif isinstance(module, torch.nn.Linear):
            key = f"{base}mlp_fc1" if m[3] == "mlp_c_fc" else f"{base}mlp_fc2"
            out.append(Target(name, None, tuple(module.weight.shape), _first_resolving(targets, [key], name, None),
                              True))
    return out


def _first_resolving(targets: Targets, candidates: Sequence[str], layer: str, part: Optional[str]) -> str:
    """The first candidate key that the built-in's rules lead back to (layer, part)."""
    is_sd2 = targets.architecture == "sd2"
    for key in candidates:
        got, got_part = resolve(key, targets.__contains__, is_sd2)
        if got is not None and got_part is None and got.endswith("_out_proj") and part == "out":
            got, got_part = got[: -len("_out_proj")], "out"
        if (got, got_part) == (layer, part):
            return key
    raise ValueError(f"no kohya name maps back to layer {layer}" + (f" part {part}" if part else "")
                     + f" (tried {', '.join(candidates)})")


# ---- tensors ---------------------------------------------------------------------------------------------------
def _kaiming_uniform(shape, g: torch.Generator) -> Tensor:
    """nn.init.kaiming_uniform_(a=sqrt(5)) (nn.Linear's default), drawn from g: bound = 1/sqrt(fan_in)."""
    fan_in = int(math.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return (torch.rand(shape, generator=g) * 2 - 1) * bound


def _normal(shape, std: float, g: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=g) * std


def factorization(dimension: int, factor: int = -1) -> Tuple[int, int]:
    """LyCORIS's split of a dimension into (m, n), m <= n, m closest to `factor` (-1: most balanced)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def _dora_scale(weight: Tensor) -> Tensor:
    """Norm of the base weight per input channel, shaped [1, in, 1...] (webui v1.10.1's DoRA axis)."""
    w = weight.detach().float()
    nd = w.dim() - 1
    return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1, keepdim=True).reshape(w.shape[1], *[1] * nd) \
        .transpose(0, 1).contiguous()


def make_weights(method: str, shape: Tuple[int, ...], dim: int, alpha: float, g: torch.Generator,
                 base_weight: Optional[Tensor] = None, lokr_factor: int = -1) -> Dict[str, Tensor]:
    """Initial tensors (float32, CPU) of one module for a weight of `shape` ([out, in] or [out, in, kh, kw])."""
    out_dim, in_dim = shape[0], shape[1]
    kernel = tuple(shape[2:])
    conv = len(shape) == 4
    w: Dict[str, Tensor] = {"alpha": torch.tensor(float(alpha))}
    if method in ("lora", "locon", "dora", "pivotal"):
        down_shape = (dim, in_dim) + (kernel if conv else ())
        up_shape = (out_dim, dim) + ((1, 1) if conv else ())
        w["lora_down.weight"] = _kaiming_uniform(down_shape, g)
        w["lora_up.weight"] = torch.zeros(up_shape)
        if method == "dora":
            if base_weight is None:
                raise ValueError("DoRA needs the base weight to initialise dora_scale")
            w["dora_scale"] = _dora_scale(base_weight)
    elif method == "loha":
        flat_in = in_dim * int(math.prod(kernel)) if conv else in_dim
        w["hada_w1_a"] = _normal((out_dim, dim), 0.1, g)
        w["hada_w1_b"] = _normal((dim, flat_in), 1.0, g)
        w["hada_w2_a"] = torch.zeros((out_dim, dim))
        w["hada_w2_b"] = _normal((dim, flat_in), 1.0, g)
    elif method == "lokr":
        out_l, out_k = factorization(out_dim, lokr_factor)
        in_m, in_n = factorization(in_dim, lokr_factor)
        w["lokr_w1"] = _kaiming_uniform((out_l, in_m), g)
        if dim < max(out_k, in_n) / 2:
            flat = in_n * int(math.prod(kernel)) if conv else in_n
            w["lokr_w2_a"] = _kaiming_uniform((out_k, dim), g)
            w["lokr_w2_b"] = torch.zeros((dim, flat))
        else:  # full w2 (LyCORIS: the rank would not be smaller); scale is 1 then
            w["lokr_w2"] = torch.zeros((out_k, in_n) + kernel)
    else:
        raise ValueError(f"method {method!r} has no network module")
    return w


_MODULE_TYPES = {"lora": LoraModule, "locon": LoraModule, "dora": LoraModule, "pivotal": LoraModule,
                 "loha": LohaModule, "lokr": LokrModule}


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
    if spec.method not in METHODS:
        raise ValueError(f"unknown method {spec.method!r}; expected one of {', '.join(METHODS)}")
    if spec.method in EMBEDDING_METHODS and embedding is None:
        raise ValueError(f"method {spec.method} needs an embedding")
    adapter = TrainableAdapter(method=spec.method, architecture=targets.architecture,
                               embeddings=[embedding] if embedding is not None else [])
    if spec.method == "ti":
        _to_device(adapter, device)
        return adapter
    g = torch.Generator().manual_seed(int(spec.seed))
    conv = spec.method in CONV_METHODS
    te_keys = set()
    if selected is None:
        selected = [(t, spec.dim, spec.alpha) for t in select_targets(targets, spec.preset, spec.train_text_encoder,
                                                                        conv)]
    for t, t_dim, t_alpha in selected:
        kxk = len(t.shape) == 4 and t.shape[2:] != (1, 1)
        dim = (spec.conv_dim or t_dim) if kxk else t_dim
        alpha = (spec.conv_alpha if spec.conv_alpha is not None else t_alpha) if kxk else t_alpha
        base = _base_weight(targets, t) if spec.method == "dora" else None
        weights = make_weights(spec.method, t.shape, dim, alpha, g, base, spec.lokr_factor)
        params = {k: (v if k == "alpha" else torch.nn.Parameter(v)) for k, v in weights.items()}
        adapter.modules[t.key] = _MODULE_TYPES[spec.method](params)
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


def _base_weight(targets: Targets, t: Target) -> Tensor:
    module = targets[t.layer]
    if isinstance(module, torch.nn.MultiheadAttention):
        if t.part == "out":
            return module.out_proj.weight
        return module.in_proj_weight.chunk(3, 0)["qkv".index(t.part)]
    return module.weight


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
            if net.dora_scale is not None:
                net.dora_scale = net.weights["dora_scale"]
        for e in adapter.embeddings:
            for p in e.parameters():
                p.data = p.data.to(device)
