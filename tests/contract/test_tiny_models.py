"""The tiny fixture models are what the rest of the suite takes them for: real ldm/sgm trees with SD's block names,
a working UNet, VAE and text encoders, every weight random (no zero-initialised layer hides an adapter), files that
load strictly and come out byte-identical for the same seed, and a tokenizer with CLIP's real ids."""
import hashlib

import pytest

from lib_tune.tiny import sgm_source
from lib_tune.tiny.tokenizer import write_clip_tokenizer
from tests.fixtures import tiny_models

CAT = [49406, 320, 1125, 539, 320, 2368, 49407]  # openai/clip-vit-large-patch14 on "a photo of a cat"
FIXTURES = {"sd1": "tiny_ldm_sd1", "sd2v": "tiny_ldm_sd2v", "sdxl": "tiny_sgm_sdxl"}
CONTEXT_DIM = {"sd1": 64, "sd2v": 256, "sdxl": 64 + 256}
# attention (".1" after a res block) where SD1/SD2 and SDXL have it, and where they have none
ATTENTION = {"sd1": ["input_blocks.1.1", "input_blocks.5.1", "middle_block.1", "output_blocks.0.1",
                     "output_blocks.5.1"],
             "sd2v": ["input_blocks.1.1", "input_blocks.5.1", "middle_block.1", "output_blocks.0.1",
                      "output_blocks.5.1"],
             "sdxl": ["input_blocks.4.1", "input_blocks.8.1", "middle_block.1", "output_blocks.0.1",
                      "output_blocks.5.1"]}
NO_ATTENTION = {"sd1": ["input_blocks.3.1", "output_blocks.6"], "sd2v": ["input_blocks.3.1", "output_blocks.6"],
                "sdxl": ["input_blocks.1.1", "input_blocks.2.1", "output_blocks.6.1", "output_blocks.9"]}


def _model(request, arch):
    return request.getfixturevalue(FIXTURES[arch])


def _encode(model, arch, prompts):
    """(cross-attention context, SDXL's vector or None) the way ldm / sgm compute them."""
    import torch

    with torch.no_grad():
        if arch != "sdxl":
            return model.get_learned_conditioning(prompts), None
        n = len(prompts)
        batch = {"txt": prompts, "original_size_as_tuple": torch.tensor([[64, 64]] * n),
                 "crop_coords_top_left": torch.tensor([[0, 0]] * n), "target_size_as_tuple": torch.tensor([[64, 64]] * n)}
        c = model.conditioner(batch)
        return c["crossattn"], c["vector"]


def test_tokenizer_has_clips_ids(tmp_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp_path / "tok")))
    assert tok("a photo of a cat").input_ids == CAT
    assert len(tok) == 49408 and tok.get_vocab()[",</w>"] == 267
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)


def test_tokenizer_agrees_with_open_clip(tmp_path):
    """Same BPE as OpenCLIP's own tokenizer (used by SD2 / SDXL's second encoder) on awkward text."""
    import open_clip
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp_path / "tok")))
    text = "A Photo, of (cat:1.2) BREAK über naïve 日本 <lora:x:0.5> 🙂"
    ids = tok(text).input_ids
    assert open_clip.tokenize([text])[0][:len(ids)].tolist() == ids


@pytest.mark.parametrize("arch", tiny_models.ARCHS)
def test_block_layout_is_sds(request, arch):
    modules = dict(_model(request, arch).model.diffusion_model.named_modules())
    for name in ATTENTION[arch]:
        assert type(modules[name]).__name__ == "SpatialTransformer", name
    for name in NO_ATTENTION[arch]:
        assert name not in modules, name
    if arch == "sdxl":  # SDXL's deepest level has two transformer blocks, as its real ones have several
        assert "input_blocks.7.1.transformer_blocks.1.attn2.to_k" in modules


@pytest.mark.parametrize("arch", tiny_models.ARCHS)
def test_every_weight_is_random(request, arch):
    """No all-zero tensor (ldm zero-initialises output projections) and no default norm scale or bias."""
    import torch

    model = _model(request, arch)
    for name, p in model.named_parameters():
        assert p.detach().abs().max() > 0, name
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm))]
    assert norms
    for m in norms:
        assert not torch.all(m.weight == 1) and not torch.all(m.bias == 0)


@pytest.mark.parametrize("arch", tiny_models.ARCHS)
def test_text_encoder_encodes_a_prompt(request, arch):
    import torch

    model = _model(request, arch)
    context, vector = _encode(model, arch, ["a photo of a cat", "a painting of a dog"])
    assert context.shape == (2, 77, CONTEXT_DIM[arch])
    assert torch.isfinite(context).all()
    assert context.mean().abs() > 1e-4  # the webui's emphasis divides by this mean
    assert (context[0] - context[1]).abs().max() > 1e-3
    if arch == "sdxl":
        assert vector.shape == (2, 1792)  # pooled OpenCLIP (256) + three size/crop embeddings (3 * 512)


@pytest.mark.parametrize("arch", tiny_models.ARCHS)
def test_unet_and_vae_run(request, arch):
    import torch

    model = _model(request, arch)
    context, vector = _encode(model, arch, ["a photo of a cat"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        extra = {} if vector is None else {"y": vector}
        out = model.model.diffusion_model(x, torch.tensor([500]), context=context, **extra)
        image = model.decode_first_stage(x)
        latent = model.encode_first_stage(torch.rand(1, 3, 64, 64, generator=g) * 2 - 1)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert 0.1 < out.std() < 10  # random weights scaled so activations stay sane
    assert image.shape == (1, 3, 64, 64)  # the VAE scales by 8, as the webui assumes
    latent = latent.sample() if hasattr(latent, "sample") else latent
    assert latent.shape == (1, 4, 8, 8)


@pytest.mark.parametrize("arch", tiny_models.ARCHS)
def test_checkpoint_file_loads_strictly_into_a_fresh_model(request, arch):
    import torch

    model = _model(request, arch)
    loaded = tiny_models.load_checkpoint(model.tiny_checkpoint_path)  # strict: no key missing, none extra
    theirs = loaded.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, theirs[name]), name


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, tiny_ldm_sd1):
    first = tiny_ldm_sd1.tiny_checkpoint_path
    again = tiny_models.write_checkpoint("sd1", tmp_path / "again", seed=0)
    other = tiny_models.write_checkpoint("sd1", tmp_path / "other", seed=1)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (first, again, other)]
    assert digest[0] == digest[1]
    assert digest[0] != digest[2]


def test_yaml_points_at_the_local_text_folder(tiny_ldm_sd1):
    from omegaconf import OmegaConf

    config = OmegaConf.load(tiny_ldm_sd1.tiny_checkpoint_path.with_suffix(".yaml"))
    version = config.model.params.cond_stage_config.params.version
    assert version == str(tiny_ldm_sd1.tiny_checkpoint_path.parent.resolve() / tiny_models.TEXT_FOLDER)
    assert config.model.params.first_stage_config.params.ddconfig.ch_mult == [1, 1, 1, 1]


def test_sgm_path_is_a_folder_with_only_sgm(tmp_path, monkeypatch):
    """Unpacked from the shared tarball into the cache (or linked from the webui host): nothing but ``sgm`` goes on
    sys.path, so generative-models' own ``tests``/``scripts`` packages cannot shadow ours."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    found = tiny_models.find_sgm_path()
    if found is None:
        pytest.skip("no generative-models source here (SD_WEBUI_PATH or ../shared/webui-src)")
    assert [p.name for p in found.iterdir()] == ["sgm"]
    assert (found / "sgm" / "models" / "diffusion.py").is_file()
    assert tiny_models.find_sgm_path() == found  # reused, not unpacked again


def test_sgm_path_skips_cleanly_without_a_source(tmp_path, monkeypatch):
    monkeypatch.delenv("SD_WEBUI_PATH", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(sgm_source, "_shared_candidates", lambda: [tmp_path / "no-shared"])
    assert tiny_models.find_sgm_path() is None
    with pytest.raises(pytest.skip.Exception, match="no sgm package"):
        tiny_models.sgm_path()
