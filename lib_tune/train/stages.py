"""Staged plans: an ordered list of stages, each training its own layers with its own rank, LR and steps, into one
adapter file.

A stage (one dict of the job's `stages` list):
- `targets` (required): a targets preset ("attn", "attn_mlp", "full": UNet layers, as the `targets` field), a
  named selector (SELECTORS below), or a list of glob patterns (fnmatch, case-sensitive) over the kohya module
  names the method can train on this model (`lora_unet_...`, `lora_te_...`, `lora_te1_...`, `lora_te2_...`;
  `full` UNet layers, convolutions only for methods that train them, and every text-encoder layer);
- `steps` (required, >= 1);
- optional `network_dim`, `network_alpha`, `unet_lr`, `te_lr` (default: the job's fields) and `name` (default:
  the preset/selector name, else "stage<i>").

Named selectors (UNet ones by the webui's ldm layer names, so SD1/SD2 and SDXL alike):
- "mid_proj": proj_in / proj_out of the middle block's transformer;
- "cross_attn": attn2 to_q/to_k/to_v/to_out.0 of every UNet transformer block;
- "unet_attn": attn1 and attn2 q/k/v/out of every UNet transformer block (the "attn" preset);
- "te": every text-encoder layer (attention q/k/v/out, MLP fc1/fc2; SDXL both encoders);
- "te_last2": the text-encoder layers of each encoder's last two transformer layers whose output reaches the
  conditioning (SDXL: both encoders'), by the encoder's own `layer` / `layer_idx`: SD2's OpenCLIP never runs its
  last layer and SDXL's CLIP-L conditions on its penultimate one, so there the two before the unused last layer
  are taken (only one when a single layer is used; SDXL's OpenCLIP feeds its last layer to the pooled vector:
  its last two). The webui's clip-skip setting is not consulted (it can change after training).
OpenCLIP's packed attention (SD2, SDXL's second encoder) is always selected whole (q, k, v and out together):
the built-in Lora needs all four parts of a packed layer.

The plan: the job trains sum(steps) steps (the job's `steps` may be left out and is derived; given, it must
equal that sum, else ConfigError "steps"); stage i runs the steps [start_i, start_i + steps_i). Stages need a
network method (not ti). The adapter holds the union of all stages' modules; a module belongs to the first
stage that selects it and has that stage's rank/alpha (a later stage selecting it again does not train it again;
kxk convolutions take conv_dim/conv_alpha when set). During stage i only its own modules train (a fresh optimizer
and LR schedule with the stage's LRs over the stage's steps; warmup: warmup_steps, capped at the stage's steps,
else warmup_ratio of the stage's steps); the modules of earlier stages stay applied, frozen, and the modules of
later stages are not applied at all until their stage starts. TI vectors (pivotal) train in every stage
at emb_lr. A stage whose selection adds no new module, or whose patterns match nothing, is an error at job start
(ConfigError naming `stages[i].targets`), as is a stage with text-encoder (UNet) layers and a te_lr (unet_lr) of 0.
"""
from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ..inject.targets import Targets
from .config_checks import ConfigError, check_float, check_int, check_str
from .methods import PRESETS, Target, select_targets, _ATTN, _HF_TE, _OC_TE

SELECTORS = ("mid_proj", "cross_attn", "unet_attn", "te", "te_last2")
STAGE_KEYS = ("targets", "steps", "network_dim", "network_alpha", "unet_lr", "te_lr", "name")

_MID_PROJ = re.compile(r"^diffusion_model_middle_block_\d+_proj_(in|out)$")
_CROSS = re.compile(r"_transformer_blocks_\d+_attn2_(to_q|to_k|to_v|to_out_0)$")


@dataclass
class Stage:
    """One stage of a plan, with the job's defaults filled in; `keys`: its modules (known with the model)."""
    index: int
    name: str
    targets: Union[str, Tuple[str, ...]]
    steps: int
    start: int
    network_dim: int
    network_alpha: float
    unet_lr: float
    te_lr: float
    keys: Tuple[str, ...] = ()
    te_keys: frozenset = field(default_factory=frozenset)

    @property
    def end(self) -> int:
        return self.start + self.steps

    def to_dict(self) -> Dict[str, Any]:
        return {"index": self.index, "name": self.name,
                "targets": self.targets if isinstance(self.targets, str) else list(self.targets),
                "steps": self.steps, "start": self.start, "network_dim": self.network_dim,
                "network_alpha": self.network_alpha, "unet_lr": self.unet_lr, "te_lr": self.te_lr,
                "modules": len(self.keys)}


# ---- config -------------------------------------------------------------------------------------------------
def check_stages(stages: Any, method: str) -> None:
    """Validate a config's `stages` value (without the model); raises ConfigError naming `stages[i].field`."""
    if stages is None:
        return
    if method == "ti":
        raise ConfigError("stages", "textual inversion trains vectors only; stages need a network method")
    if not isinstance(stages, list) or not stages:
        raise ConfigError("stages", "must be a non-empty list of stages (or null)")
    for i, st in enumerate(stages):
        at = f"stages[{i}]"
        if not isinstance(st, dict):
            raise ConfigError(at, "must be an object with targets and steps")
        for key in st:
            if key not in STAGE_KEYS:
                raise ConfigError(f"{at}.{key}", f"unknown stage field (known: {', '.join(STAGE_KEYS)})")
        for key in ("targets", "steps"):
            if key not in st or st[key] is None:
                raise ConfigError(f"{at}.{key}", "is required")
        t = st["targets"]
        if isinstance(t, str):
            if t not in PRESETS + SELECTORS:
                raise ConfigError(f"{at}.targets", f"must be one of {', '.join(PRESETS + SELECTORS)} or a list "
                                                   f"of glob patterns, not {t!r}")
        elif isinstance(t, list):
            if not t or not all(isinstance(p, str) and p.strip() for p in t):
                raise ConfigError(f"{at}.targets", "a list of targets must hold non-empty glob patterns")
        else:
            raise ConfigError(f"{at}.targets", f"must be a name or a list of glob patterns, not {t!r}")
        check_int(f"{at}.steps", st["steps"], 1, 10_000_000)
        if st.get("network_dim") is not None:
            check_int(f"{at}.network_dim", st["network_dim"], 1, 1024)
        if st.get("network_alpha") is not None:
            check_float(f"{at}.network_alpha", st["network_alpha"], 0.0, 1e6, open_low=True)
        for key in ("unet_lr", "te_lr"):
            if st.get(key) is not None:
                check_float(f"{at}.{key}", st[key], 0.0, 10.0)
        if st.get("name") is not None:
            check_str(f"{at}.name", st["name"], required=True)


def total_steps(stages: Sequence[Dict[str, Any]]) -> int:
    return sum(int(st["steps"]) for st in stages)


def build_plan(cfg) -> List[Stage]:
    """The stages of a validated TrainConfig with its defaults filled in (no modules yet)."""
    out, start = [], 0
    for i, st in enumerate(cfg.stages or []):
        t = st["targets"]
        targets = t if isinstance(t, str) else tuple(t)
        name = st.get("name") or (t if isinstance(t, str) else f"stage{i + 1}")

        def get(key, default):
            return st[key] if st.get(key) is not None else default
        out.append(Stage(index=i, name=name, targets=targets, steps=int(st["steps"]), start=start,
                         network_dim=int(get("network_dim", cfg.network_dim)),
                         network_alpha=float(get("network_alpha", cfg.network_alpha)),
                         unet_lr=float(get("unet_lr", cfg.unet_lr)), te_lr=float(get("te_lr", cfg.te_lr))))
        start += int(st["steps"])
    return out


def stage_warmup(cfg, stage: Stage) -> int:
    if cfg.warmup_steps is not None:
        return min(int(cfg.warmup_steps), stage.steps)
    return int(round(cfg.warmup_ratio * stage.steps))


def plan_metadata(cfg) -> str:
    """The plan as the file's `ss_tune_stages` value (JSON)."""
    return json.dumps([{k: v for k, v in s.to_dict().items() if k not in ("index", "modules")}
                       for s in build_plan(cfg)])


def stage_at(plan: Sequence[Stage], step: int) -> int:
    """The index of the stage that runs step `step` (0-based); the last stage for step >= the total."""
    for s in plan:
        if step < s.end:
            return s.index
    return len(plan) - 1


# ---- selection ----------------------------------------------------------------------------------------------
def candidates(targets: Targets, conv: bool) -> List[Target]:
    """Every layer a method can adapt on this model: the "full" UNet layers and every text-encoder layer."""
    return select_targets(targets, "full", True, conv)


def _te_index(t: Target) -> Tuple[str, int]:
    m = _HF_TE.match(t.layer) or _OC_TE.match(t.layer)
    if m is None:
        raise ValueError(f"not a text-encoder layer: {t.layer}")
    return t.key.split("text_model", 1)[0], int(m[2])


def unused_last_layers(model) -> Dict[str, int]:
    """{kohya text-encoder prefix: how many of its last layers do not reach the conditioning} for a
    DiffusionModel (its encoders' ldm/sgm `layer` / `layer_idx` settings; 0 when unknown)."""
    prefixes = ["lora_te1_", "lora_te2_"] if model.architecture == "sdxl" else ["lora_te_"]
    out = {}
    for prefix, enc in zip(prefixes, model.text_encoder_modules()):
        e = getattr(enc, "wrapped", enc)
        layer, idx = getattr(e, "layer", None), getattr(e, "layer_idx", None)
        n = 0
        if getattr(e, "return_pooled", False) or getattr(e, "always_return_pooled", False) or \
                not isinstance(idx, int) or layer in (None, "last", "pooled"):
            n = 0  # the last layer's output is used (the pooled vector or the last hidden state)
        elif hasattr(getattr(e, "transformer", None), "text_model"):  # Hugging Face CLIP: hidden_states[layer_idx]
            total = len(e.transformer.text_model.encoder.layers)
            n = total - (idx if idx >= 0 else total + 1 + idx) if layer == "hidden" else 0
        else:  # OpenCLIP: the last layer_idx resblocks are skipped (penultimate: 1)
            n = idx
        out[prefix] = max(0, int(n))
    return out


def select(targets: Targets, universe: Sequence[Target], selector: Union[str, Sequence[str]],
           conv: bool, unused: Optional[Dict[str, int]] = None) -> List[Target]:
    """The targets of `universe` a stage's `targets` value picks, in the universe's order. Packed attention parts
    are completed (all of a layer's parts once any is picked)."""
    if isinstance(selector, str) and selector in PRESETS:
        keys = {t.key for t in select_targets(targets, selector, False, conv)}
        picked = [t for t in universe if t.key in keys]
    elif selector == "mid_proj":
        picked = [t for t in universe if not t.is_te and _MID_PROJ.match(t.layer)]
    elif selector == "cross_attn":
        picked = [t for t in universe if not t.is_te and _CROSS.search(t.layer)]
    elif selector == "unet_attn":
        picked = [t for t in universe if not t.is_te and _ATTN.search(t.layer)]
    elif selector == "te":
        picked = [t for t in universe if t.is_te]
    elif selector == "te_last2":
        te = [t for t in universe if t.is_te]
        last: Dict[str, int] = {}
        for t in te:
            enc, idx = _te_index(t)
            last[enc] = max(last.get(enc, -1), idx)
        last = {enc: max(0, i - (unused or {}).get(enc, 0)) for enc, i in last.items()}
        picked = [t for t in te if last[_te_index(t)[0]] - 1 <= _te_index(t)[1] <= last[_te_index(t)[0]]]
    elif isinstance(selector, str):
        raise ValueError(f"unknown selector {selector!r}")
    else:
        pats = list(selector)
        picked = [t for t in universe if any(fnmatch.fnmatchcase(t.key, p) for p in pats)]
    chosen = set(picked)
    packed = {t.layer for t in picked if t.part is not None}
    return [t for t in universe if t in chosen or (t.part is not None and t.layer in packed)]


def resolve_plan(targets: Targets, plan: List[Stage], conv: bool,
                 unused: Optional[Dict[str, int]] = None) -> List[Tuple[Target, int, float]]:
    """Fill each stage's `keys` (the modules it trains) and return the adapter's modules as (target, dim, alpha),
    the union of all stages in model order. ConfigError `stages[i].targets` when a stage selects nothing (new)."""
    universe = candidates(targets, conv)
    owner: Dict[str, int] = {}
    for s in plan:
        picked = select(targets, universe, s.targets, conv, unused)
        if not picked:
            what = s.targets if isinstance(s.targets, str) else ", ".join(s.targets)
            raise ConfigError(f"stages[{s.index}].targets",
                              f"stage {s.index + 1} '{s.name}': {what} matches no layer of this model that "
                              f"method can train (kohya names such as {universe[0].key if universe else '-'})")
        new = [t for t in picked if t.key not in owner]
        if not new:
            raise ConfigError(f"stages[{s.index}].targets",
                              f"stage {s.index + 1} '{s.name}': every layer it selects belongs to an earlier "
                              f"stage (a layer trains in the first stage that selects it)")
        for t in new:
            owner[t.key] = s.index
        s.keys = tuple(t.key for t in new)
        s.te_keys = frozenset(t.key for t in new if t.is_te)
        has_unet = len(s.te_keys) < len(s.keys)
        if s.te_keys and not s.te_lr:
            raise ConfigError(f"stages[{s.index}].te_lr", f"stage {s.index + 1} '{s.name}' selects text-encoder "
                                                          f"layers: its te_lr must be > 0")
        if has_unet and not s.unet_lr:
            raise ConfigError(f"stages[{s.index}].unet_lr", f"stage {s.index + 1} '{s.name}' selects UNet "
                                                            f"layers: its unet_lr must be > 0")
    return [(t, plan[owner[t.key]].network_dim, plan[owner[t.key]].network_alpha)
            for t in universe if t.key in owner]
