"""The contract layer's models: the real ldm / sgm module trees (the classes the webui runs), built tiny in-process
from the same yaml and weights as the fixture checkpoints the e2e layer hands to a real webui (no webui here).

Session-scoped and shared: a test that changes a model (hooks, wrapped forwards, attributes, weights) must undo it.
The models are in eval mode on the CPU, with the text encoders' ``device`` set to "cpu" (ldm/sgm default to "cuda"
there; the webui ignores that attribute, its hijack moves the tokens itself).
"""
from pathlib import Path

import pytest

from tests.fixtures import tiny_models

NEEDED = ("torch", "transformers", "open_clip", "omegaconf", "safetensors", "pytorch_lightning")


def _require_libraries():
    for name in NEEDED:
        pytest.importorskip(name, reason=f"contract layer: {name} is not installed (the .venv test environment has it)")


def _on_cpu(model):
    encoders = getattr(getattr(model, "conditioner", None), "embedders", None) or [model.cond_stage_model]
    for enc in encoders:
        if hasattr(enc, "device"):
            enc.device = "cpu"
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory) -> Path:
    """Where the session's tiny checkpoints (.safetensors + .yaml) and the tokenizer folder are written."""
    return tmp_path_factory.mktemp("tiny-ckpt")


def _build(arch, folder):
    _require_libraries()
    if arch == "sdxl":
        tiny_models.sgm_path()  # skips cleanly when no generative-models source is around
    else:
        pytest.importorskip("ldm", reason="contract layer: Stability's ldm (stable-diffusion-sdkit) is not installed")
    path, model = tiny_models.build_checkpoint(arch, folder, seed=0)
    model.tiny_checkpoint_path = path  # where its weights are (.safetensors; .yaml beside it)
    return _on_cpu(model)


@pytest.fixture(scope="session")
def tiny_ldm_sd1(tiny_checkpoint_dir):
    """ldm LatentDiffusion, SD1 layout (transformers CLIP text encoder from a local folder)."""
    return _build("sd1", tiny_checkpoint_dir)


@pytest.fixture(scope="session")
def tiny_ldm_sd2v(tiny_checkpoint_dir):
    """ldm LatentDiffusion, SD2 v-prediction layout (OpenCLIP ViT-S-32-alt text encoder, linear transformer proj)."""
    return _build("sd2v", tiny_checkpoint_dir)


@pytest.fixture(scope="session")
def tiny_sgm_sdxl(tiny_checkpoint_dir):
    """sgm DiffusionEngine, SDXL layout (tiny CLIP + OpenCLIP ViT-S-32-alt, three UNet levels)."""
    return _build("sdxl", tiny_checkpoint_dir)
