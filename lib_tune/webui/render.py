"""One image from the webui's own txt2img pipeline, for work the extension does itself (training previews, DreamBooth
class images): no grid or sample files, the prompt's <lora:>/<tune:> tags not activated (what the model computes is
what the caller applied), and the webui's progress text and step counters left as the caller had them.
"""
from __future__ import annotations

from typing import Optional

from modules import shared


def render(sd_model, prompt: str, *, seed: int, width: int, height: int, steps: int, cfg_scale: float,
           sampler: str, scheduler: Optional[str] = None, negative_prompt: str = ""):
    """The first image of a txt2img with these settings (a PIL image), or None when the webui returned none."""
    from modules import processing

    extra = {"scheduler": scheduler} if scheduler else {}
    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=sd_model, prompt=prompt, negative_prompt=negative_prompt, steps=int(steps), width=int(width),
        height=int(height), seed=int(seed), subseed=-1, subseed_strength=0.0, cfg_scale=float(cfg_scale),
        sampler_name=sampler, batch_size=1, n_iter=1, do_not_save_grid=True, do_not_save_samples=True, **extra)
    p.disable_extra_networks = True
    st = shared.state
    keep = (st.job, st.sampling_steps, st.sampling_step, st.textinfo)
    try:
        processed = processing.process_images(p)
    finally:
        p.close()
        st.job, st.sampling_steps, st.sampling_step, st.textinfo = keep
    return processed.images[0] if processed.images else None
