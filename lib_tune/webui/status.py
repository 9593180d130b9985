"""What the Tune tab and the API report about the webui state: the loaded model and its architecture."""
from modules import shared

from .. import __version__


def model_architecture(sd_model) -> str:
    """'SDXL', 'SD2-v', 'SD2', 'SD1' or 'none' for the model the webui has loaded."""
    if sd_model is None:
        return "none"
    if getattr(sd_model, "is_sdxl", False):
        return "SDXL"
    if getattr(sd_model, "is_sd2", False):
        return "SD2-v" if getattr(sd_model, "parameterization", "eps") == "v" else "SD2"
    return "SD1"


def status() -> dict:
    sd_model = shared.sd_model if getattr(shared, "sd_model", None) is not None else None
    info = getattr(sd_model, "sd_checkpoint_info", None)
    return {
        "version": __version__,
        "model": getattr(info, "name_for_extra", None) or getattr(info, "title", None),
        "architecture": model_architecture(sd_model),
    }
