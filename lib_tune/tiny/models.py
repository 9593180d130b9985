"""Tiny, random, deterministic Stable Diffusion checkpoints (SD1, SD2-v, SDXL) that a real webui v1.10.1 loads.

Why build them from the real classes: the webui (and this extension's hooks) find modules by their state-dict
names (``model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q``, ``cond_stage_model.transformer
.text_model...``, ``conditioner.embedders.1.model...``). Instantiating ldm's ``LatentDiffusion`` / sgm's
``DiffusionEngine`` from a shrunken copy of the real yaml gives exactly those names and shapes that follow the same
rules, with no hand-written key lists to drift. The yaml is written beside the ``.safetensors`` (same name), which
is how the webui picks the config of a checkpoint it cannot guess.

Shape choices:
- two res blocks per UNet level, attention where SD has it, so the built-in Lora's diffusers -> compvis block
  arithmetic (input block = 1 + 3*level + index) holds; SDXL has three levels with attention on the last two, so
  its block names are SDXL's (``input_blocks.4.1``, ``middle_block.1`` ...).
- the VAE keeps four levels (downsampling by 8), or the webui's images come out at the wrong size.
- every parameter is random (see ``randomize_``): ldm zero-initialises output projections, which would hide
  adapters, and all-ones/all-zeros text LayerNorms make the webui's emphasis step divide 0 by 0.

Used by the demo (``python -m lib_tune demo`` trains on the SD1 one), the tests (contract: in-process models; e2e:
checkpoint files for a real webui) and the benchmarks; on the command line ``python -m lib_tune.tiny.models DEST``
writes all three. ``ldm`` is Stability's package (stable-diffusion-sdkit in the test venv, the webui's
repositories/ in a webui); ``sgm`` is found by sgm_source.py. Nothing is downloaded: the text encoders' configs
and the CLIP tokenizer are written locally (tokenizer.py).
"""
from __future__ import annotations

import contextlib
import copy
import math
import sys
import zlib
from pathlib import Path

from .sgm_source import import_sgm
from .tokenizer import TINY_CLIP_TEXT_CONFIG, write_clip_text_folder

ARCHS = ("sd1", "sd2v", "sdxl")
NAMES = {"sd1": "tiny-sd1", "sd2v": "tiny-sd2v", "sdxl": "tiny-sdxl"}
TEXT_FOLDER = "tiny-clip-text"  # beside the checkpoints; the yaml of sd1/sdxl points at it (absolute path)
OPENCLIP_ARCH = "ViT-S-32-alt"  # open-clip-torch 2.20's smallest registered text tower: width 256, 10 layers
OPENCLIP_WIDTH = 256


# ---- configs ---------------------------------------------------------------------------------------------------
def _vae_config(target: str, **ddconfig_extra) -> dict:
    """AutoencoderKL with SD's four levels (8x downsampling) but 32 channels instead of 128..512."""
    ddconfig = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=32,
                    ch_mult=[1, 1, 1, 1], num_res_blocks=2, attn_resolutions=[], dropout=0.0, **ddconfig_extra)
    return {"target": target, "params": {"embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": ddconfig,
                                         "lossconfig": {"target": "torch.nn.Identity"}}}


def _ldm_config(unet: dict, cond_stage: dict, **extra) -> dict:
    """ldm LatentDiffusion as in configs/v1-inference.yaml / v2-inference-v.yaml (schedule and keys unchanged)."""
    params = dict(linear_start=0.00085, linear_end=0.0120, num_timesteps_cond=1, log_every_t=200, timesteps=1000,
                  first_stage_key="jpg", cond_stage_key="txt", image_size=64, channels=4, cond_stage_trainable=False,
                  conditioning_key="crossattn", monitor="val/loss_simple_ema", scale_factor=0.18215, use_ema=False,
                  **extra)
    unet_params = dict(use_checkpoint=False, use_fp16=False, image_size=32, in_channels=4, out_channels=4,
                       model_channels=32, attention_resolutions=[1, 2], num_res_blocks=2, channel_mult=[1, 2],
                       use_spatial_transformer=True, transformer_depth=1, legacy=False, **unet)
    params["unet_config"] = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_params}
    params["first_stage_config"] = _vae_config("ldm.models.autoencoder.AutoencoderKL")
    params["cond_stage_config"] = cond_stage
    return {"model": {"base_learning_rate": 1.0e-04, "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                      "params": params}}


def _sdxl_config(text_folder: str) -> dict:
    """sgm DiffusionEngine shaped like generative-models' configs/inference/sd_xl_base.yaml."""
    clip_hidden = TINY_CLIP_TEXT_CONFIG["hidden_size"]
    penultimate = TINY_CLIP_TEXT_CONFIG["num_hidden_layers"] - 1  # SDXL uses CLIP-L's penultimate layer (11 of 12)
    emb = "sgm.modules.encoders.modules."
    embedders = [
        {"is_trainable": False, "input_key": "txt", "target": emb + "FrozenCLIPEmbedder",
         "params": {"layer": "hidden", "layer_idx": penultimate, "version": text_folder}},
        {"is_trainable": False, "input_key": "txt", "target": emb + "FrozenOpenCLIPEmbedder2",
         "params": {"arch": OPENCLIP_ARCH, "version": None, "freeze": True, "layer": "penultimate",
                    "always_return_pooled": True, "legacy": False}},
    ] + [{"is_trainable": False, "input_key": key, "target": emb + "ConcatTimestepEmbedderND",
          "params": {"outdim": 256}}
         for key in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")]
    dm = "sgm.modules.diffusionmodules."
    network = dict(adm_in_channels=OPENCLIP_WIDTH + 3 * 2 * 256, num_classes="sequential", use_checkpoint=False,
                   in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2, 4], num_res_blocks=2,
                   channel_mult=[1, 2, 2], num_head_channels=16, use_spatial_transformer=True,
                   use_linear_in_transformer=True, transformer_depth=[1, 1, 2],
                   context_dim=clip_hidden + OPENCLIP_WIDTH, spatial_transformer_attn_type="softmax", legacy=False)
    params = {
        "scale_factor": 0.13025,
        "disable_first_stage_autocast": True,
        "denoiser_config": {"target": dm + "denoiser.DiscreteDenoiser", "params": {
            "num_idx": 1000,
            "weighting_config": {"target": dm + "denoiser_weighting.EpsWeighting"},
            "scaling_config": {"target": dm + "denoiser_scaling.EpsScaling"},
            "discretization_config": {"target": dm + "discretizer.LegacyDDPMDiscretization"}}},
        "network_config": {"target": dm + "openaimodel.UNetModel", "params": network},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": embedders}},
        "first_stage_config": _vae_config("sgm.models.autoencoder.AutoencoderKLInferenceWrapper", attn_type="vanilla"),
    }
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": params}}


def tiny_config(arch: str, text_folder) -> dict:
    """The yaml content (plain dict) of a tiny checkpoint; ``text_folder`` holds the local CLIP tokenizer/config."""
    text_folder = str(Path(text_folder).resolve())
    if arch == "sd1":
        return _ldm_config(
            unet=dict(num_heads=4, context_dim=TINY_CLIP_TEXT_CONFIG["hidden_size"]),
            cond_stage={"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                        "params": {"version": text_folder}})
    if arch == "sd2v":
        return _ldm_config(
            unet=dict(num_head_channels=16, use_linear_in_transformer=True, context_dim=OPENCLIP_WIDTH),
            cond_stage={"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                        "params": {"arch": OPENCLIP_ARCH, "version": None, "freeze": True, "layer": "penultimate"}},
            parameterization="v")
    if arch == "sdxl":
        return _sdxl_config(text_folder)
    raise ValueError(f"arch must be one of {ARCHS}, not {arch!r}")


def write_config(arch: str, folder) -> Path:
    """Write ``<name>.yaml`` (and the shared tokenizer folder it points at) into ``folder``."""
    from omegaconf import OmegaConf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text_folder = write_clip_text_folder(folder / TEXT_FOLDER)
    path = folder / f"{NAMES[arch]}.yaml"
    OmegaConf.save(OmegaConf.create(tiny_config(arch, text_folder)), path)
    return path


# ---- building ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def offline_text_encoders():
    """Build ``CLIPTextModel.from_pretrained(folder)`` from the folder's config.json alone (the weights come from the
    checkpoint), as the webui does while it builds a model; open_clip gets ``pretrained=None`` from the yaml."""
    from unittest import mock

    from transformers import CLIPTextConfig, CLIPTextModel

    def from_config(cls, name_or_path, *args, **kwargs):
        model = cls(CLIPTextConfig.from_pretrained(name_or_path))
        model.name_or_path = str(name_or_path)
        return model

    with mock.patch.object(CLIPTextModel, "from_pretrained", classmethod(from_config)):
        yield


@contextlib.contextmanager
def no_default_init():
    """Skip torch's random parameter initialisation (randomize_ overwrites every parameter anyway): the same three
    functions the webui's DisableInitialization turns off; this halves the build time. Buffers are untouched."""
    from unittest import mock

    import torch

    def do_nothing(*args, **kwargs):
        pass

    with contextlib.ExitStack() as stack:
        for name in ("kaiming_uniform_", "_no_grad_normal_", "_no_grad_uniform_"):
            if hasattr(torch.nn.init, name):
                stack.enter_context(mock.patch.object(torch.nn.init, name, do_nothing))
        yield


def instantiate(config: dict):
    """The real ldm / sgm model object for a config dict (weights not yet meaningful: see ``randomize_``)."""
    target = config["model"]["target"]
    if target.startswith("sgm."):
        import_sgm()
        from sgm.util import instantiate_from_config
    else:
        from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf

    with offline_text_encoders(), no_default_init():
        model = instantiate_from_config(OmegaConf.create(copy.deepcopy(config))["model"])
    return model.eval()


def _norm_weight_names(model) -> set:
    import torch

    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    return {f"{name}.weight" if name else "weight" for name, m in model.named_modules() if isinstance(m, norms)}


def randomize_(model, seed: int = 0):
    """Overwrite every parameter with seeded random values (in place) and return the model.

    Each tensor gets its own generator, seeded from ``seed`` and its name, so values do not depend on the order of
    construction. Weights: N(0, 1/fan_in), which keeps activations near unit scale through the many residual adds
    (ldm's zero-initialised output projections included, so that adapters on them show). Norm scales:
    1 + N(0, 0.1^2), biases N(0, 0.05^2): never the defaults, or the webui's emphasis divides 0 by 0."""
    import torch

    norm_weights = _norm_weight_names(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63))
            if name in norm_weights:
                p.normal_(1.0, 0.1, generator=g)
            elif p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
            else:  # biases, scalars (open_clip's logit_scale)
                p.normal_(0.0, 0.05, generator=g)
    return model


def build_model(arch: str, folder, seed: int = 0):
    """The randomised model for ``arch`` in-process; ``folder`` receives the tokenizer folder its config needs."""
    text_folder = write_clip_text_folder(Path(folder) / TEXT_FOLDER)
    return randomize_(instantiate(tiny_config(arch, text_folder)), seed)


def _state_dict_for_saving(model) -> dict:
    """Every parameter and persistent buffer (as a real checkpoint has), contiguous as safetensors needs (the CLIP
    ``position_ids`` buffer is an expanded view)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def build_checkpoint(arch: str, folder, seed: int = 0):
    """Write ``<folder>/<name>.safetensors`` + same-named ``.yaml`` (+ the tokenizer folder) and return
    ``(path, model)``: the model is the one whose weights were written (so in-process users need not rebuild it)."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    folder = Path(folder)
    yaml_path = write_config(arch, folder)
    model = randomize_(instantiate(OmegaConf.to_container(OmegaConf.load(yaml_path))), seed)
    path = folder / f"{NAMES[arch]}.safetensors"
    # one metadata key only: safetensors writes the metadata from a hash map, so with two keys their order (and the
    # file's bytes) would change from run to run
    save_file(_state_dict_for_saving(model), str(path), metadata={"format": "pt"})
    return path, model


def write_checkpoint(arch: str, folder, seed: int = 0) -> Path:
    """Write ``<folder>/<name>.safetensors`` + same-named ``.yaml`` (+ the tokenizer folder) and return the
    ``.safetensors`` path. The same arch and seed give the same bytes."""
    return build_checkpoint(arch, folder, seed)[0]


def load_checkpoint(path):
    """Instantiate the model of a tiny ``.safetensors`` from its same-named ``.yaml`` and load its weights strictly
    (so a file that lacks or adds a key fails here, not silently as in the webui's ``strict=False``)."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    path = Path(path)
    config = OmegaConf.to_container(OmegaConf.load(path.with_suffix(".yaml")))
    model = instantiate(config)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


def write_all(folder, seed: int = 0) -> dict:
    """All three tiny checkpoints into one folder: {arch: path to the .safetensors}."""
    return {arch: write_checkpoint(arch, folder, seed) for arch in ARCHS}


def main(argv=None) -> int:
    import argparse
    import time

    parser = argparse.ArgumentParser(prog="python -m lib_tune.tiny.models", description=__doc__.split("\n")[0])
    parser.add_argument("dest", help="folder for the checkpoints (e.g. a webui --ckpt-dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arch", choices=ARCHS, action="append", help="only these (repeatable); default all")
    args = parser.parse_args(argv)
    for arch in args.arch or ARCHS:
        t0 = time.monotonic()
        path = write_checkpoint(arch, args.dest, args.seed)
        print(f"{arch}: {path} ({path.stat().st_size / 2 ** 20:.1f} MiB, {time.monotonic() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
