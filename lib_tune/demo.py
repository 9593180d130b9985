"""`python -m lib_tune demo`: the whole training path on a tiny model, with no webui and no download.

Builds the tiny random SD1 model the tests use too (lib_tune/tiny/models.py: the real ldm classes, shrunken),
draws a small synthetic dataset (a yellow square on purple, at six positions, captioned), trains a LoRA on it on
the CPU, and writes: the adapter (`tunedemo.safetensors`, loadable by the webui's built-in Lora on the tiny
checkpoint), a before/after image (same prompt and seed, adapter off / on, sampled with a 20-step DDIM), and the
loss curve. The tiny model is random, so its images are coloured noise; what the demo shows is that the adapter
changes them and that the loss falls. Tiny models need about ten times a real model's learning rate, hence 5e-3
here.

It needs torch and Stability's ldm package: in a checkout, run it with `.venv/bin/python` (dev/install.sh builds
that environment; README, "Try it without a webui").
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .tiny.models import build_model

TRIGGER = "tunedemo"
CAPTION = "a yellow square on purple"


def make_dataset(folder: Path, n: int = 6, size: int = 64) -> Path:
    """n images of one concept (a yellow square on a purple background, moving), each with a caption file."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (size, size), (90, 30, 140))
        x, y = size // 8 + 5 * i, size // 6 + 3 * i
        ImageDraw.Draw(im).rectangle([x, y, x + size * 3 // 8, y + size * 3 // 8], fill=(250, 220, 40))
        im.save(folder / f"square{i}.png")
        (folder / f"square{i}.txt").write_text(CAPTION, encoding="utf-8")
    return folder


def _side_by_side(images, labels, scale: int = 4):
    from PIL import Image, ImageDraw

    w, h = images[0].size
    W, H = w * scale, h * scale
    out = Image.new("RGB", (W * len(images), H + 20), (255, 255, 255))
    for i, (im, label) in enumerate(zip(images, labels)):
        out.paste(im.resize((W, H), Image.NEAREST), (i * W, 20))
        ImageDraw.Draw(out).text((i * W + 4, 4), label, fill=(0, 0, 0))
    return out


def run_demo(out: Path, steps: int = 100, seed: int = 0, log=print) -> dict:
    """Run the demo into `out`; returns the paths written and the measured losses and times."""
    import torch

    t_start = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's ops are far too small to gain from threads; they only contend
    try:
        return _run(out, steps, seed, log, t_start)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, steps: int, seed: int, log, t_start: float) -> dict:
    from .inject.engine import Injector
    from .train.config import TrainConfig
    from .train.data import prepare_data
    from .train.loop import Trainer, TrainerCallbacks
    from .train.model import DiffusionModel
    from .train.objective import loss_at_fixed_noise
    from .train.plot import loss_curve
    from .train.sampling import ddim_sample, to_pil

    out.mkdir(parents=True, exist_ok=True)
    log("building the tiny SD1 model ...")
    sd_model = build_model("sd1", out / "tiny-model", seed=seed)
    model = DiffusionModel(sd_model)
    data_dir = make_dataset(out / "dataset")
    cfg = TrainConfig.from_dict(dict(
        dataset=str(data_dir), method="lora", steps=steps, output_name=TRIGGER, trigger=TRIGGER,
        output_dir=str(out), targets="attn", network_dim=8, network_alpha=4.0, unet_lr=5e-3,
        train_text_encoder=False, lr_scheduler="constant", min_snr_gamma=None, resolution=64, min_bucket=64,
        save_state=False, seed=seed))
    data = prepare_data(cfg, model)
    prompt = f"{TRIGGER}, {CAPTION}"

    def sample():
        cond, uncond = model.encode_text([prompt]), model.encode_text([""])
        return to_pil(model.decode_latents(ddim_sample(model, cond, uncond, (1, 4, 8, 8), steps=20, seed=seed))[0])

    def fixed_loss():
        return sum(loss_at_fixed_noise(model, b.latents, model.encode_text(b.captions), seed=1234, repeats=4)
                   for b in data.fixed_set()) / len(data.fixed_set())

    before, base_loss = sample(), fixed_loss()

    class Progress(TrainerCallbacks):
        def on_step(self, step, total, loss, lr):
            if step == 1 or step % 10 == 0 or step == total:
                log(f"step {step}/{total} loss {loss:.4f} lr {lr:.2e}")

    log(f"training a LoRA for {steps} steps on {len(data.items)} images ...")
    t0 = time.monotonic()
    trainer = Trainer(cfg, model, data, Progress())
    result = trainer.run()
    train_s = time.monotonic() - t0

    injector = Injector()
    injector.apply(trainer.adapter.entries(), train=False)
    try:
        after, trained_loss = sample(), fixed_loss()
    finally:
        injector.clear()
    from PIL import Image, ImageChops

    example = Image.open(data_dir / "square0.png").convert("RGB")
    compare = out / "before_after.png"
    diff = ImageChops.difference(before, after).point(lambda v: min(255, v * 4))
    _side_by_side([example, before, after, diff],
                  ["training image", "adapter off", "adapter on", "difference x4"]).save(compare)
    curve = loss_curve(result.losses, str(out / "loss_curve.png"),
                       title=f"LoRA on tiny SD1: loss per step ({steps} steps)")
    info = {"adapter": result.adapter_path, "before_after": str(compare), "loss_curve": curve,
            "fixed_noise_loss_base": base_loss, "fixed_noise_loss_trained": trained_loss,
            "train_seconds": train_s, "total_seconds": time.monotonic() - t_start}
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_tune demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="tune-demo", help="output folder (default: ./tune-demo)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    info = run_demo(Path(args.out).resolve(), steps=args.steps, seed=args.seed)
    print()
    print(f"adapter:        {info['adapter']}")
    print(f"before/after:   {info['before_after']}")
    print(f"loss curve:     {info['loss_curve']}")
    print(f"fixed-noise loss on the training images: {info['fixed_noise_loss_base']:.4f} (base) -> "
          f"{info['fixed_noise_loss_trained']:.4f} (with the LoRA)")
    print(f"training took {info['train_seconds']:.1f} s, the whole demo {info['total_seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
