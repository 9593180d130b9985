"""Per-block weights, compatible with hako-mikan/sd-webui-lora-block-weight (LBW).

Source of every table and preset below: LBW `scripts/lora_block_weight.py` @b403cb7 (2025-06-19), lines 53-59
(BLOCKID12/17/20/26) and 77-88 (DEF_WEIGHT_PRESET); the single-block presets (`lbw=IN02`, README "use new
syntax") come from LBW's older `scripts/lbwpresets.txt` @be07d78.

How LBW applies a vector, and so how we do (LBW `to26` L1365-1370, `ratiodealer` L1287-1310):
  * the vector's length picks its table (12, 17, 20 or 26 names); it is spread onto the 26 SD1-style slots
    BASE, IN00..IN11, M00, OUT00..OUT11 and every slot the table does not name gets 0 (LBW README: "any layers
    not provided will be treated as having a weight of 0");
  * a module's block is its ldm index: text-encoder modules are BASE, `input_blocks_N` is IN{N:02},
    `middle_block` is M00, `output_blocks_N` is OUT{N:02}; SDXL uses the same names for its 9+1+9 blocks;
  * modules in no block (time embedding, conv_out, SDXL's label_emb) keep multiplier 1.
The 17-value layout lists SD1's attention blocks, the 12-value one SDXL's; 26 (LyCORIS, every SD1 block) and 20
(every SDXL block) also cover conv-only blocks. LBW's 61-value FLUX layout is not supported (no FLUX here).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

from ..layer_names import IO_BLOCKS, lbw_block
from .errors import TagError
from .tokens import fmt_number, is_number

BLOCKID26 = ("BASE", "IN00", "IN01", "IN02", "IN03", "IN04", "IN05", "IN06", "IN07", "IN08", "IN09", "IN10",
             "IN11", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08",
             "OUT09", "OUT10", "OUT11")
BLOCKID17 = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06",
             "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")
BLOCKID12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05")
BLOCKID20 = ("BASE", "IN00", "IN01", "IN02", "IN03", "IN04", "IN05", "IN06", "IN07", "IN08", "M00", "OUT00",
             "OUT01", "OUT02", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08")
LAYOUTS: Dict[int, Tuple[str, ...]] = {12: BLOCKID12, 17: BLOCKID17, 20: BLOCKID20, 26: BLOCKID26}

#: vector lengths whose table matches the architecture's UNet (others work, as in LBW, but zero real blocks)
NATIVE_LENGTHS = {"sd1": (17, 26), "sd2": (17, 26), "sdxl": (12, 20, 26)}


def _vec(text: str) -> Tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def _single_block_presets() -> Dict[str, Tuple[float, ...]]:
    """LBW's one-block presets over the 17-value table: `IN02` = only IN02, `NIN02` = all but IN02. The block
    M00 is spelled MID as in LBW. (LBW's old file has NMID with BASE=0 too, which looks like a typo; ours keeps
    BASE=1 like every other N preset.)"""
    out: Dict[str, Tuple[float, ...]] = {}
    for i, block in enumerate(BLOCKID17):
        name = "MID" if block == "M00" else block
        out[name] = tuple(1.0 if j == i else 0.0 for j in range(17))
        out["N" + name] = tuple(0.0 if j == i else 1.0 for j in range(17))
    return out


#: LBW's default presets (DEF_WEIGHT_PRESET @b403cb7, FLUXALL left out) plus the single-block ones.
PRESETS: Dict[str, Tuple[float, ...]] = {
    "NONE": _vec("0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0"),
    "ALL": _vec("1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1"),
    "INS": _vec("1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0"),
    "IND": _vec("1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0"),
    "INALL": _vec("1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0"),
    "MIDD": _vec("1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0"),
    "OUTD": _vec("1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0"),
    "OUTS": _vec("1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1"),
    "OUTALL": _vec("1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"),
    "ALL0.5": _vec("0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5"),
    **_single_block_presets(),
}

_PRESET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.+\-]*")
_VALUE_SEP = re.compile(r"[,\s]+")
_RANDOM_VALUE = re.compile(r"[RUX]", re.IGNORECASE)


@dataclass(frozen=True)
class BlockWeights:
    """A block-weight vector in one of LBW's layouts; `preset` names the preset it came from, if any."""
    values: Tuple[float, ...]
    preset: Optional[str] = None

    def __post_init__(self):
        if len(self.values) not in LAYOUTS:
            raise ValueError(f"a block-weight vector has 12, 17, 20 or 26 values, not {len(self.values)}")

    @property
    def layout(self) -> Tuple[str, ...]:
        return LAYOUTS[len(self.values)]

    def by_block(self) -> Dict[str, float]:
        """The 26 SD1-style slots with their weight (0 for slots the layout does not name, as LBW does)."""
        named = dict(zip(self.layout, self.values))
        return {b: named.get(b, 0.0) for b in BLOCKID26}

    def multiplier(self, key: str, arch: str) -> float:
        return block_multiplier(self, key, arch)

    def to_text(self) -> str:
        """The preset name when it is one of the built-in presets (those exist on every install), else the
        numbers."""
        if self.preset is not None and PRESETS.get(self.preset) == self.values:
            return self.preset
        return ",".join(fmt_number(v) for v in self.values)

    def __str__(self) -> str:
        return self.to_text()


def _lookup_preset(name: str, presets: Mapping[str, Sequence[float]]) -> Optional[Tuple[str, Sequence[float]]]:
    if name in presets:
        return name, presets[name]
    folded = [k for k in presets if k.lower() == name.lower()]
    if len(folded) == 1:
        return folded[0], presets[folded[0]]
    return None


def parse_block_weights(text: str, presets: Optional[Mapping[str, Sequence[float]]] = None) -> BlockWeights:
    """Read `lbw=` text: 12/17/20/26 numbers separated by commas and/or blanks, or a preset name (user presets
    first, then the built-in ones; exact case first, then a unique case-insensitive match). TagError if neither."""
    text = str(text).strip()
    if not text:
        raise TagError("lbw is empty")
    table = dict(PRESETS)
    table.update(presets or {})
    if _PRESET_NAME.fullmatch(text) and not _RANDOM_VALUE.fullmatch(text):
        found = _lookup_preset(text, table)
        if found is None:
            known = sorted(table)
            shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
            raise TagError(f"lbw preset {text!r} is unknown (known: {shown})")
        name, values = found
        try:
            return BlockWeights(tuple(float(v) for v in values), preset=name)
        except (TypeError, ValueError) as e:
            raise TagError(f"lbw preset {name!r} is not a valid vector: {e}") from None
    tokens = [t for t in _VALUE_SEP.split(text) if t]
    for t in tokens:
        if _RANDOM_VALUE.match(t):
            raise TagError(f"lbw value {t!r}: LBW's random/inherited values (R, U, X) are not supported")
        if not is_number(t):
            raise TagError(f"lbw value {t!r} is not a number")
    if len(tokens) == 61:
        raise TagError("lbw has 61 values (LBW's FLUX layout), which is not supported")
    if len(tokens) not in LAYOUTS:
        raise TagError(f"lbw has {len(tokens)} values; expected 12, 17, 20 or 26 values or a preset name")
    return BlockWeights(tuple(float(t) for t in tokens))


def looks_like_block_weights(text: str, presets: Optional[Mapping[str, Sequence[float]]] = None) -> bool:
    """True for a vector (any list of numbers with a separator) or a known preset name: used to accept LBW's
    old positional form `<lora:name:1:1,0,0,...>` / `<lora:name:1:INS>` in the unet-weight slot."""
    text = str(text).strip()
    if _VALUE_SEP.search(text):
        return True
    table = dict(PRESETS)
    table.update(presets or {})
    return bool(_PRESET_NAME.fullmatch(text)) and _lookup_preset(text, table) is not None


def parse_preset_text(text: str) -> Dict[str, Tuple[float, ...]]:
    """Read presets in LBW's file format (`lbwpresets.txt`): one `NAME:v,v,...` per line. Lines without ':',
    with a '#', or with a count other than 12/17/20/26 are skipped, as LBW's `checkloadcond` does."""
    out: Dict[str, Tuple[float, ...]] = {}
    for line in str(text).splitlines():
        if ":" not in line or "#" in line:
            continue
        name, values = line.split(":", 1)
        tokens = [t.strip() for t in values.split(",")]
        if len(tokens) not in LAYOUTS or not all(is_number(t) for t in tokens) or not name.strip():
            continue
        out[name.strip()] = tuple(float(t) for t in tokens)
    return out


# --- module key -> block -------------------------------------------------------------------------------------
def _check_arch(arch: str) -> str:
    a = str(arch).lower()
    if a not in IO_BLOCKS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(IO_BLOCKS)}")
    return a


def block_of(canonical_key: str, arch: str) -> Optional[str]:
    """LBW block id ('BASE', 'IN04', 'M00', 'OUT05', ...) of an adapter module, or None for modules in no block.

    `canonical_key` is the kohya-style key of lib_tune.formats (`lora_te*_...` for text encoders; `lora_unet_`
    + diffusers names `down_blocks_1_attentions_0_...` or ldm names `input_blocks_4_1_...`); the names and the
    block arithmetic are lib_tune.layer_names'. Blocks past the architecture's last one give None."""
    return lbw_block(canonical_key, _check_arch(arch))


def block_multiplier(vector: Union[BlockWeights, Sequence[float]], key: str, arch: str) -> float:
    """The factor LBW would give module `key`: 1 outside every block, 0 for a block the layout leaves out."""
    bw = vector if isinstance(vector, BlockWeights) else BlockWeights(tuple(float(v) for v in vector))
    block = block_of(key, arch)
    if block is None:
        return 1.0
    return bw.by_block()[block]


def arch_warning(vector: BlockWeights, arch: str) -> Optional[str]:
    """A sentence for the user when the vector's layout is not made for `arch` (e.g. a 17-value SD1 preset on
    SDXL zeroes SDXL's OUT00-OUT02), else None."""
    a = _check_arch(arch)
    n = len(vector.values)
    if n in NATIVE_LENGTHS[a]:
        return None
    native = " or ".join(str(x) for x in NATIVE_LENGTHS[a])
    missing = [b for b in BLOCKID26 if b not in vector.layout and (b in ("BASE", "M00") or int(b[-2:]) < IO_BLOCKS[a])]
    return (f"block weights with {n} values are laid out for another architecture; {a} expects {native} values "
            f"(blocks {', '.join(missing)} get weight 0)")
