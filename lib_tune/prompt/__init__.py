"""Prompt side of the runtime: the `<tune:...>` tag grammar, weight schedules, block weights and infotext.

Pure Python (no torch, no webui). The webui layer (lib_tune.webui) feeds ExtraNetworkParams.items to
`parse_params`, warns and skips on TagError, and writes/reads the infotext fields with `infotext`."""
from .blocks import (PRESETS, BlockWeights, arch_warning, block_multiplier, block_of, parse_block_weights,
                     parse_preset_text)
from .errors import InfotextError, TagError
from .infotext import (HASHES_FIELD, TUNE_FIELD, format_adapters, format_hashes, parse_adapters, parse_hashes,
                       restore_prompt)
from .schedule import Schedule, StepBound
from .tags import AdapterRequest, find_tags, parse_params, parse_tag

__all__ = [
    "AdapterRequest", "BlockWeights", "HASHES_FIELD", "InfotextError", "PRESETS", "Schedule", "StepBound", "TUNE_FIELD",
    "TagError", "arch_warning", "block_multiplier", "block_of", "find_tags", "format_adapters", "format_hashes",
    "parse_adapters", "parse_block_weights", "parse_hashes", "parse_params", "parse_preset_text", "parse_tag",
    "restore_prompt",
]
