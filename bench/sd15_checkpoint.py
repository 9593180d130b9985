"""A random-weight checkpoint with the real SD1.5 architecture, made locally (nothing downloaded), for benchmarks.

Why random weights are enough: a training step costs the same whatever the weights hold, as long as the values
stay ordinary floats (no NaN/inf, no denormals that slow CPUs down). The weights come from
lib_tune/tiny/models.py's ``randomize_`` (seeded per tensor, N(0, 1/fan_in), norm scales near 1), which
keeps activations near unit scale through the whole UNet.

What is written (into ``folder``, reused when complete):
- ``sd15-random-seed<S>.safetensors``: one file with the ldm key names a real SD1.5 file has
  (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``, the schedule buffers),
  readable by the webui, by kohya sd-scripts and by ``load_into`` below; about 4 GB in float32;
- ``sd15-random-seed<S>.yaml``: webui's configs/v1-inference.yaml shapes (UNet 320 x (1, 2, 4, 4), attention at
  4/2/1, 8 heads, context 768; VAE 128 x (1, 2, 4, 4)), its text encoder pointing at
- ``clip-l/``: a CLIP-L-shaped text-model config (hidden 768, 12 layers, 12 heads, MLP 3072, vocab 49408) and the
  CLIP tokenizer (the real BPE table, lib_tune/tiny/tokenizer.py);
- ``TOKENIZERS/openai_clip-vit-large-patch14/``: the same tokenizer files, where kohya's
  ``--tokenizer_cache_dir TOKENIZERS`` looks for them offline.

Building the model skips torch's default initialisation (tiny_models.no_default_init), which for 1B parameters
would take minutes and be overwritten anyway.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

KOHYA_TOKENIZER = "openai_clip-vit-large-patch14"
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768)


def default_folder() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sd-webui-tune" / "bench"


def sd15_config(text_folder) -> dict:
    """The model part of webui's configs/v1-inference.yaml (the training-irrelevant scheduler_config left out),
    with the text encoder's ``version`` pointing at a local folder."""
    unet = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                transformer_depth=1, context_dim=768, use_checkpoint=False, legacy=False)
    ddconfig = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                    ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    params = dict(
        linear_start=0.00085, linear_end=0.0120, num_timesteps_cond=1, log_every_t=200, timesteps=1000,
        first_stage_key="jpg", cond_stage_key="txt", image_size=64, channels=4, cond_stage_trainable=False,
        conditioning_key="crossattn", monitor="val/loss_simple_ema", scale_factor=0.18215, use_ema=False,
        unet_config={"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        first_stage_config={"target": "ldm.models.autoencoder.AutoencoderKL",
                            "params": {"embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": ddconfig,
                                       "lossconfig": {"target": "torch.nn.Identity"}}},
        cond_stage_config={"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                           "params": {"version": str(Path(text_folder).resolve())}})
    return {"model": {"base_learning_rate": 1.0e-04, "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                      "params": params}}


def paths(folder, seed: int = 0) -> dict:
    folder = Path(folder)
    stem = f"sd15-random-seed{seed}"
    return {"ckpt": folder / f"{stem}.safetensors", "yaml": folder / f"{stem}.yaml", "text": folder / "clip-l",
            "tokenizers": folder / "TOKENIZERS"}


def ensure(folder=None, seed: int = 0, log=print) -> dict:
    """The paths of the checkpoint, its yaml, the text folder and kohya's tokenizer folder; built if missing.
    The .safetensors is written under a temporary name and renamed, so a present file is always complete."""
    from lib_tune.tiny.tokenizer import write_clip_text_folder, write_clip_tokenizer

    p = paths(folder or default_folder(), seed)
    p["ckpt"].parent.mkdir(parents=True, exist_ok=True)
    write_clip_text_folder(p["text"], **CLIP_L)
    write_clip_tokenizer(p["tokenizers"] / KOHYA_TOKENIZER)
    p["yaml"].write_text(json.dumps(sd15_config(p["text"]), indent=1))  # JSON is YAML: OmegaConf.load reads it
    if not p["ckpt"].is_file():
        log(f"writing a random SD1.5-architecture checkpoint to {p['ckpt']} (once; about 4 GB) ...")
        _write(p, seed)
    return p


def _write(p: dict, seed: int) -> None:
    from safetensors.torch import save_file

    from lib_tune.tiny import models as tiny_models

    model = tiny_models.randomize_(tiny_models.instantiate(sd15_config(p["text"])), seed)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = p["ckpt"].with_name(p["ckpt"].name + f".tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, p["ckpt"])
    finally:
        if tmp.exists():
            tmp.unlink()


def load_into(model, path) -> None:
    """Read a .safetensors straight into the parameters and buffers of `model` (strict: the same keys and shapes).

    Why not ``model.load_state_dict(load_file(path))``: that holds every weight twice for a moment, and the peak
    would be counted against training. The webui avoids the copy too (it builds on the meta device and takes
    the state dict's tensors as the parameters); here each tensor is read from the file into its destination,
    so memory ends at one copy of the weights, as in the webui."""
    import numpy as np
    import torch

    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}
    state = model.state_dict(keep_vars=True)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        missing, extra = sorted(set(state) - set(header)), sorted(set(header) - set(state))
        if missing or extra:
            raise ValueError(f"{path}: missing keys {missing[:3]}, unexpected keys {extra[:3]}")
        for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            dst = state[key]
            if tuple(info["shape"]) != tuple(dst.shape) or dtypes[info["dtype"]] != dst.dtype:
                raise ValueError(f"{key}: file has {info['dtype']} {info['shape']}, model {dst.dtype} "
                                 f"{tuple(dst.shape)}")
            begin, end = info["data_offsets"]
            f.seek(8 + n + begin)
            with torch.no_grad():
                target = dst.data if dst.is_contiguous() else torch.empty_like(dst)
                buf = target.view(-1).view(torch.uint8).numpy() if target.numel() else np.empty(0, np.uint8)
                if f.readinto(memoryview(buf)) != end - begin:
                    raise ValueError(f"{path}: truncated at {key}")
                if target is not dst.data:
                    dst.copy_(target)


def remove(folder=None, seed: int = 0) -> None:
    """Delete what ensure() wrote (for a clean rebuild)."""
    p = paths(folder or default_folder(), seed)
    for k in ("ckpt", "yaml"):
        if p[k].exists():
            p[k].unlink()
    for k in ("text", "tokenizers"):
        shutil.rmtree(p[k], ignore_errors=True)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python bench/sd15_checkpoint.py", description=__doc__.split("\n")[0])
    parser.add_argument("folder", nargs="?", default=None, help=f"default: {default_folder()}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    p = ensure(args.folder, args.seed)
    print(json.dumps({k: str(v) for k, v in p.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
