"""Adapter tools (issue 17): pure functions over lib_tune.formats' AdapterFile, no webui.

- resize.resize_adapter / resize_file: rank of a LoRA/LoCon (fixed or kohya's dynamic methods); LoHa/LoKr/full
  modules are materialised and reduced by a randomized SVD.
- merge.merge_adapters / merge_files: several adapters into one (`concat`, exact; `svd` to a target rank).
Both compute SVDs of up @ down from the factors (lowrank.factor_svd: QR of each factor, SVD of the small core) and
report the Frobenius retention per module and overall (report.Report), which also goes into the file's metadata.
"""
from .lowrank import DYNAMIC_METHODS, ToolError, factor_svd, pick_rank
from .report import ModuleReport, Report

__all__ = ["DYNAMIC_METHODS", "ModuleReport", "Report", "ToolError", "factor_svd", "pick_rank"]
