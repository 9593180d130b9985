"""Tiny, random Stable Diffusion models (SD1, SD2-v, SDXL) built from the real ldm/sgm classes, with no download.

Shipped (not in tests/) because `python -m lib_tune demo` trains on one; the tests and the benchmarks build theirs
here too. models.py builds and writes them, tokenizer.py writes the local CLIP tokenizer their yaml points at,
sgm_source.py finds SDXL's `sgm` package. Nothing here imports the webui or runs at import.
"""
