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
    out = {
        "version": __version__,
        "model": getattr(info, "name_for_extra", None) or getattr(info, "title", None),
        "architecture": model_architecture(sd_model),
    }
    try:
        from . import networks
        lib = networks.runtime().library
        out["adapters"] = len(lib.entries)
        out["skipped_files"] = [{"path": x.path, "reason": x.reason} for x in lib.skipped]
    except Exception as e:  # the status never fails for the library's sake
        out["adapters"], out["skipped_files"] = None, [{"path": "", "reason": f"library unavailable: {e}"}]
    return out


def model_hash() -> dict:
    """sha256 over every parameter and buffer of the loaded model (names, dtypes, shapes, bytes): a diagnostic
    that the base weights are unchanged by the extension."""
    import hashlib

    import torch
    h = hashlib.sha256()
    sd_model = shared.sd_model
    n = 0
    with torch.no_grad():
        for name, t in sorted(sd_model.state_dict(keep_vars=True).items()):
            t = t.detach()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            n += 1
    return {"sha256": h.hexdigest(), "tensors": n}
