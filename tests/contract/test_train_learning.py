"""Training really learns, on the real ldm / sgm classes (tiny, random): the denoising loss on the training
images at fixed noise and timesteps falls after training, measured through the file the trainer saved, and the
base model is bit-identical afterwards, also after an exception or a stop mid-run.

Learning rates are about ten times a real model's (docs webui-host.md: a tiny random model needs that). Textual
inversion needs one more thing: on these random models the text conditioning barely matters (zeroing the whole
conditioning moves the loss by about 2%: the cross-attention branch is a small part of the residual stream), so
no choice of vectors could remove 30% of the loss. The TI test scales the cross-attention output projections
(attn2.to_out) by 8 for its duration, as in a trained model where the prompt steers the image, and restores them
bit for bit afterwards; it also checks that the gain belongs to the trigger word.
"""
import contextlib
import os

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

from lib_tune.formats import load_adapter
from lib_tune.inject import Injector, activate, map_adapter
from lib_tune.train.config import TrainConfig
from lib_tune.train.data import prepare_data
from lib_tune.train.embeddings import PlaceholderEmbeddingHook, TrainableEmbedding
from lib_tune.train.loop import Trainer, TrainerCallbacks, step_generator
from lib_tune.train.model import DiffusionModel
from lib_tune.train.objective import add_noise, loss_at_fixed_noise, sample_noise, sample_timesteps
from tests.unit.train_fakes import model_fingerprint

CAPTION = "a yellow square on purple"


# (one torch thread: the session-wide fixture in tests/conftest.py)


@pytest.fixture(scope="module")
def concept(tmp_path_factory):
    """Six 64 px images of one synthetic concept, captioned."""
    folder = tmp_path_factory.mktemp("concept")
    for i in range(6):
        im = Image.new("RGB", (64, 64), (90, 30, 140))
        x, y = 8 + 5 * i, 10 + 3 * i
        ImageDraw.Draw(im).rectangle([x, y, x + 24, y + 24], fill=(250, 220, 40))
        im.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(CAPTION, encoding="utf-8")
    return folder


def make(sd_model, concept, out, **over):
    values = dict(dataset=str(concept), method="lora", steps=150, output_name="sq", trigger="sqtok",
                  output_dir=str(out), targets="attn", network_dim=16, network_alpha=8.0, unet_lr=5e-3,
                  train_text_encoder=False, lr_scheduler="constant", min_snr_gamma=None, resolution=64,
                  min_bucket=64, save_dtype="fp32", save_state=False, seed=0)
    values.update(over)
    cfg = TrainConfig.from_dict(values)
    dm = DiffusionModel(sd_model)
    return dm, Trainer(cfg, dm, prepare_data(cfg, dm))


def fixed_loss(trainer, file=None, embeddings=(), captions=None):
    """Mean fixed-noise loss over the training images; with `file`, the saved adapter applied by the engine (and
    its bundled embeddings spliced in), else `embeddings` only."""
    dm = trainer.model
    inj, hook = Injector(), None
    embs = list(embeddings)
    if file is not None:
        loaded = load_adapter(file)
        if loaded.modules:
            inj.apply(activate(map_adapter(loaded, dm.targets)), train=False)
        for name, e in loaded.embeddings.items():
            vecs = e.vectors if "emb" not in e.vectors else {dm.text_encoders()[0].key: e.vectors["emb"]}
            embs.append(TrainableEmbedding(name, vecs))
    if embs:
        hook = PlaceholderEmbeddingHook(embs)
        hook.install(dm)
    try:
        total, batches = 0.0, trainer.data.fixed_set()
        for b in batches:
            caps = b.captions if captions is None else [captions] * len(b.captions)
            total += loss_at_fixed_noise(dm, b.latents, dm.encode_text(caps, b.size_cond), seed=4321, repeats=4)
        return total / len(batches)
    finally:
        inj.clear()
        if hook is not None:
            hook.remove()


def test_lora_learns_the_concept(tiny_ldm_sd1, concept, tmp_path):
    before = model_fingerprint(tiny_ldm_sd1)
    dm, trainer = make(tiny_ldm_sd1, concept, tmp_path)
    base = fixed_loss(trainer)
    result = trainer.run()
    assert model_fingerprint(tiny_ldm_sd1) == before
    assert result.adapter_path == str(tmp_path / "sq.safetensors") and result.steps_done == 150
    trained = fixed_loss(trainer, file=result.adapter_path)
    reduction = 1 - trained / base
    print(f"LoRA SD1: fixed-noise loss {base:.4f} -> {trained:.4f} ({reduction:.1%} lower)")
    assert reduction >= 0.30
    md = load_adapter(result.adapter_path).metadata
    assert (md["ss_base_model_version"], md["ss_network_module"], md["ss_output_name"]) == \
        ("sd_v1", "networks.lora", "sq")
    assert md["ss_steps"] == "150" and md["sshs_model_hash"] and md["modelspec.architecture"] == \
        "stable-diffusion-v1/lora"


@contextlib.contextmanager
def text_that_matters(sd_model, factor: float = 8.0):
    """The UNet's cross-attention output projections scaled by `factor`, restored exactly afterwards."""
    saved = []
    with torch.no_grad():
        for name, m in sd_model.model.diffusion_model.named_modules():
            if name.endswith("attn2.to_out.0"):
                saved.append((m.weight, m.weight.detach().clone()))
                m.weight.mul_(factor)
    assert saved
    try:
        yield
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)


def test_textual_inversion_learns_through_the_trigger_only(tiny_ldm_sd1, concept, tmp_path):
    untouched = model_fingerprint(tiny_ldm_sd1)
    with text_that_matters(tiny_ldm_sd1):
        _textual_inversion_learns(tiny_ldm_sd1, concept, tmp_path)
    assert model_fingerprint(tiny_ldm_sd1) == untouched


def _textual_inversion_learns(tiny_ldm_sd1, concept, tmp_path):
    before = model_fingerprint(tiny_ldm_sd1)
    dm, trainer = make(tiny_ldm_sd1, concept, tmp_path, method="ti", output_name="sqtok", steps=300,
                       num_vectors=16, emb_lr=0.3, init_text="square")
    initial = [TrainableEmbedding("sqtok", {k: v.detach().clone() for k, v in e.vectors.items()})
               for e in trainer.adapter.embeddings]
    at_init = fixed_loss(trainer, embeddings=initial)
    result = trainer.run()
    assert model_fingerprint(tiny_ldm_sd1) == before
    assert result.adapter_path == str(tmp_path / "sqtok.safetensors")
    from safetensors.torch import load_file

    tensors = load_file(result.adapter_path)
    assert set(tensors) == {"emb_params"} and tensors["emb_params"].shape == (16, 64)
    trained = fixed_loss(trainer, embeddings=[TrainableEmbedding("sqtok", {"clip_l": tensors["emb_params"]})])
    reduction = 1 - trained / at_init
    # the same vectors without the trigger in the prompt: the base model's loss
    no_trigger = fixed_loss(trainer, embeddings=[TrainableEmbedding("sqtok", {"clip_l": tensors["emb_params"]})],
                            captions=CAPTION)
    plain = fixed_loss(trainer, captions=CAPTION)
    print(f"TI SD1: fixed-noise loss {at_init:.4f} (initial vectors) -> {trained:.4f} ({reduction:.1%} lower); "
          f"prompt without the trigger {plain:.4f} / {no_trigger:.4f}")
    assert reduction >= 0.30
    assert no_trigger == pytest.approx(plain, rel=1e-6)


def test_pivotal_learns_and_bundles_the_embedding(tiny_ldm_sd1, concept, tmp_path):
    before = model_fingerprint(tiny_ldm_sd1)
    dm, trainer = make(tiny_ldm_sd1, concept, tmp_path, method="pivotal", steps=120, num_vectors=2, emb_lr=5e-2)
    base = fixed_loss(trainer)
    result = trainer.run()
    assert model_fingerprint(tiny_ldm_sd1) == before
    loaded = load_adapter(result.adapter_path)
    assert list(loaded.embeddings) == ["sqtok"] and loaded.embeddings["sqtok"].n_vectors == 2
    with safe_open(result.adapter_path, "pt") as f:
        assert "bundle_emb.sqtok.string_to_param.*" in f.keys()
    trained = fixed_loss(trainer, file=result.adapter_path)
    reduction = 1 - trained / base
    print(f"pivotal SD1: fixed-noise loss {base:.4f} -> {trained:.4f} ({reduction:.1%} lower)")
    assert reduction >= 0.30
    vecs = loaded.embeddings["sqtok"].vectors["emb"]
    init = trainer.adapter.embeddings[0].vectors["clip_l"]  # trained in place: equals the file
    torch.testing.assert_close(vecs, init.detach().cpu())


def test_sd2_v_trains_on_v_targets(tiny_ldm_sd2v, concept, tmp_path):
    before = model_fingerprint(tiny_ldm_sd2v)
    dm, trainer = make(tiny_ldm_sd2v, concept, tmp_path, steps=100)
    assert dm.prediction_type == "v"
    # the first step's loss is the v-target loss of the untrained (zero-delta) model on batch 0
    batch = trainer.data.batch(0)
    g = step_generator(0, 0)
    noise = sample_noise(batch.latents, g)
    t = sample_timesteps(batch.latents.shape[0], g, 0, 1000, device=batch.latents.device)
    x_t = add_noise(batch.latents, noise, t, dm.alphas_cumprod)
    a = dm.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    v = a.sqrt() * noise - (1 - a).sqrt() * batch.latents
    with torch.no_grad():
        pred = dm.predict(x_t, t, dm.encode_text(batch.captions))
    want_v = float(((pred - v) ** 2).mean())
    want_eps = float(((pred - noise) ** 2).mean())
    base = fixed_loss(trainer)
    result = trainer.run()
    assert result.losses[0] == pytest.approx(want_v, rel=1e-4) and want_v != pytest.approx(want_eps, rel=1e-2)
    assert model_fingerprint(tiny_ldm_sd2v) == before
    trained = fixed_loss(trainer, file=result.adapter_path)
    reduction = 1 - trained / base
    print(f"LoRA SD2-v: fixed-noise loss {base:.4f} -> {trained:.4f} ({reduction:.1%} lower)")
    assert reduction >= 0.30
    assert load_adapter(result.adapter_path).metadata["ss_base_model_version"] == "sd_v2_v"


class Boom(RuntimeError):
    pass


def test_base_model_intact_after_exception_and_stop(tiny_ldm_sd1, concept, tmp_path):
    before = model_fingerprint(tiny_ldm_sd1)

    class Raise(TrainerCallbacks):
        def on_step(self, step, total, loss, lr):
            if step == 2:
                raise Boom()

    dm, trainer = make(tiny_ldm_sd1, concept, tmp_path / "a", method="locon", targets="full", steps=5,
                       train_text_encoder=True, te_lr=1e-3, gradient_checkpointing=True)
    trainer.callbacks = Raise()
    with pytest.raises(Boom):
        trainer.run()
    assert model_fingerprint(tiny_ldm_sd1) == before
    assert not os.path.exists(tmp_path / "a" / "sq.safetensors")

    class Stop(TrainerCallbacks):
        steps = 0

        def on_step(self, step, total, loss, lr):
            self.steps = step

        def should_stop(self):
            return self.steps >= 2

    dm, trainer = make(tiny_ldm_sd1, concept, tmp_path / "b", method="pivotal", steps=5, train_text_encoder=True,
                       te_lr=1e-3, prior="base_prediction", class_prompt="a square")
    trainer.callbacks = Stop()
    result = trainer.run()
    assert result.stopped and result.steps_done == 2 and os.path.exists(result.adapter_path)
    assert model_fingerprint(tiny_ldm_sd1) == before


def test_sdxl_pivotal_with_both_text_encoders(tiny_sgm_sdxl, concept, tmp_path):
    before = model_fingerprint(tiny_sgm_sdxl)
    dm, trainer = make(tiny_sgm_sdxl, concept, tmp_path, method="pivotal", steps=6, train_text_encoder=True,
                       te_lr=1e-3, emb_lr=1e-2, batch_size=2)
    result = trainer.run()
    assert model_fingerprint(tiny_sgm_sdxl) == before
    assert all(torch.isfinite(torch.tensor(result.losses)))
    from safetensors.torch import load_file, save_file

    tensors = load_file(result.adapter_path)
    assert tensors["bundle_emb.sqtok.clip_l"].shape == (2, 64) and tensors["bundle_emb.sqtok.clip_g"].shape == (2, 256)
    # lib_tune.formats insists on real SDXL widths (768/1280) for clip_l/clip_g, so read the network part alone
    network = str(tmp_path / "network.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("bundle_emb.")}, network,
              metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    loaded = load_adapter(network)
    keys = set(loaded.modules)
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)
    with safe_open(result.adapter_path, "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    mapped = map_adapter(loaded, dm.targets)
    assert not mapped.unmapped and not mapped.partial
    # the text-encoder adapters learned something (their up matrices start at zero)
    te = [m for k, m in trainer.adapter.modules.items() if k in trainer.adapter.te_keys]
    assert any(float(m.weights["lora_up.weight"].detach().abs().sum()) > 0 for m in te)
