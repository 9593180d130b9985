"""The trainer's view of the real ldm / sgm classes (tiny): DiffusionModel, trainable adapters with text-encoder
layers on every architecture (packed OpenCLIP attention included), TI initial vectors and the placeholder hook
that splices them, and the files the trainer writes as the readers and the built-in's rules see them."""
import pytest
import torch

from lib_tune.formats import load_adapter, save_adapter
from lib_tune.inject import Injector, activate, map_adapter
from lib_tune.train.kohya_metadata import base_model_version
from lib_tune.train.embeddings import PlaceholderEmbeddingHook, TrainableEmbedding, init_embedding
from lib_tune.train.methods import MethodSpec, create_adapter
from lib_tune.train.model import DiffusionModel

ARCHS = {"tiny_ldm_sd1": ("sd1", "eps", ["clip_l"]), "tiny_ldm_sd2v": ("sd2", "v", ["clip_h"]),
         "tiny_sgm_sdxl": ("sdxl", "eps", ["clip_l", "clip_g"])}


# (one torch thread: the session-wide fixture in tests/conftest.py)


@pytest.fixture(params=list(ARCHS))
def arch_model(request):
    return request.param, request.getfixturevalue(request.param)


def test_diffusion_model_reads_the_model(arch_model):
    name, sd_model = arch_model
    arch, pred, encoders = ARCHS[name]
    dm = DiffusionModel(sd_model)
    assert (dm.architecture, dm.prediction_type, dm.num_timesteps) == (arch, pred, 1000)
    assert [e.key for e in dm.text_encoders()] == encoders
    # the schedule is SD's linear-beta DDPM schedule: a_0 = 1 - 0.00085
    assert float(dm.alphas_cumprod[0]) == pytest.approx(1 - 0.00085, rel=1e-5)
    assert bool((dm.alphas_cumprod[1:] < dm.alphas_cumprod[:-1]).all())
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lat = dm.encode_images(pixels)
    assert lat.shape == (1, 4, 8, 8) and torch.equal(lat, dm.encode_images(pixels))
    assert dm.decode_latents(lat).shape == (1, 3, 64, 64)
    cond = dm.encode_text(["a photo of a cat", "a dog"])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = dm.predict(x, torch.tensor([10, 900]), cond)
    assert out.shape == x.shape and torch.isfinite(out).all()
    if arch == "sdxl":
        assert set(cond) == {"crossattn", "vector"}
        other = dm.encode_text(["a photo of a cat", "a dog"], size_cond=[(512, 512, 0, 0, 512, 512)] * 2)
        assert torch.equal(other["crossattn"], cond["crossattn"])
        assert not torch.equal(other["vector"], cond["vector"])  # size/crop conditioning reaches the vector


@pytest.mark.parametrize("method", ["lora", "loha", "lokr", "dora"])
def test_adapters_with_text_encoder_map_and_round_trip(arch_model, method, tmp_path):
    name, sd_model = arch_model
    dm = DiffusionModel(sd_model)
    adapter = create_adapter(dm.targets, MethodSpec(method=method, preset="attn_mlp", dim=4, alpha=2.0,
                                                    train_text_encoder=True, seed=0))
    keys = set(adapter.modules)
    prefixes = {"sd1": ("lora_te_",), "sd2": ("lora_te_",), "sdxl": ("lora_te1_", "lora_te2_")}[dm.architecture]
    for prefix in prefixes:
        assert any(k.startswith(prefix) for k in keys), prefix
    if dm.architecture in ("sd2", "sdxl"):  # packed OpenCLIP attention: all four parts, as the built-in needs
        te = "lora_te_" if dm.architecture == "sd2" else "lora_te2_"
        for part in ("q", "k", "v", "out"):
            assert f"{te}text_model_encoder_layers_0_self_attn_{part}_proj" in keys
        assert not adapter.mapped.partial
    unet_prefix = "lora_unet_down_blocks_" if dm.architecture != "sdxl" else "lora_unet_input_blocks_"
    assert any(k.startswith(unet_prefix) for k in keys)
    assert {e.key for e in adapter.mapped.entries} == keys

    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    path = str(tmp_path / "a.safetensors")
    version = base_model_version(dm.architecture, dm.prediction_type == "v")
    save_adapter(path, adapter.tensors(), {"ss_base_model_version": version})
    loaded = load_adapter(path)
    assert loaded.architecture == dm.architecture and not loaded.unplaced
    mapped = map_adapter(loaded, dm.targets)
    assert {e.key for e in mapped.entries} == keys and not mapped.unmapped
    # the text encoder's output changes the same way with the live adapter and with the file
    inj = Injector()
    base = dm.encode_text(["a red square"])
    outs = []
    for entries, train in ((adapter.entries(), True), (activate(mapped), False)):
        inj.apply(entries, train=train)
        try:
            with torch.no_grad():
                outs.append(dm.encode_text(["a red square"]))
        finally:
            inj.clear()
    first = lambda c: c["crossattn"] if isinstance(c, dict) else c  # noqa: E731
    assert not torch.allclose(first(outs[0]), first(base), atol=1e-5)
    torch.testing.assert_close(first(outs[1]), first(outs[0]), rtol=1e-4, atol=1e-5)


def test_ti_vectors_start_from_the_init_text(arch_model):
    name, sd_model = arch_model
    dm = DiffusionModel(sd_model)
    emb = init_embedding(dm, "zqtok", 3, "red square")
    for enc in dm.text_encoders():
        ids = enc.word_ids("red square")
        assert len(ids) == 2
        table = enc.token_embedding.weight.detach()
        want = torch.stack([table[ids[i * 2 // 3]] for i in range(3)])  # webui: vector i = token i*len//n
        torch.testing.assert_close(emb.vectors[enc.key].detach(), want)
    bundle = emb.file_tensors(bundle=True)
    if dm.is_sdxl:
        assert set(bundle) == {"bundle_emb.zqtok.clip_l", "bundle_emb.zqtok.clip_g"}
        assert set(emb.file_tensors(bundle=False)) == {"clip_l", "clip_g"}
    else:
        assert set(bundle) == {"bundle_emb.zqtok.string_to_param.*"}
        assert set(emb.file_tensors(bundle=False)) == {"emb_params"}


def test_placeholder_hook_splices_vectors_where_the_trigger_is(arch_model):
    name, sd_model = arch_model
    dm = DiffusionModel(sd_model)
    encoders = dm.text_encoders()
    g = torch.Generator().manual_seed(0)
    emb = TrainableEmbedding("zqtok", {e.key: torch.randn(2, e.width, generator=g) for e in encoders})
    hook = PlaceholderEmbeddingHook([emb])
    plain = dm.encode_text(["a photo of a cat"])
    hook.install(dm)
    try:
        rewritten = hook.rewrite(["zqtok, a photo", "a photo of a cat"])
        word = rewritten[0].split(",")[0].split()
        assert len(word) == 2 and word[0] == word[1] and rewritten[1] == "a photo of a cat"
        # captions without the trigger encode exactly as without the hook
        first = lambda c: c["crossattn"] if isinstance(c, dict) else c  # noqa: E731
        torch.testing.assert_close(first(dm.encode_text(["a photo of a cat"])), first(plain))
        # the vectors land at the trigger's positions: compare the token-embedding output with a manual splice
        for enc in encoders:
            seen = {}
            h = enc.token_embedding.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
            try:
                dm.encode_text(["zqtok, a photo"])
            finally:
                h.remove()
            out = seen["out"][0]
            ids = enc.tokenize(["zqtok, a photo"])[0]  # unrewritten: the trigger's own BPE tokens
            assert out.shape[0] == ids.shape[0]
            torch.testing.assert_close(out[1:3], emb.vectors[enc.key].detach())
            # everything after the trigger is the ordinary embedding of ", a photo"
            rest = enc.word_ids(", a photo")
            torch.testing.assert_close(out[3:3 + len(rest)], enc.token_embedding.weight[rest].detach())
        # gradients reach the vectors through the frozen encoder (sgm's conditioner needs the session for that)
        with dm.session(train_unet=False, train_text=True):
            cond = dm.encode_text(["zqtok, a photo"])
            first(cond).sum().backward()
        assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in emb.parameters())
    finally:
        hook.remove()
    assert dm.text_hook is None
    torch.testing.assert_close(first(dm.encode_text(["a photo of a cat"])), first(plain))


def test_placeholder_is_never_taken_from_the_captions(tiny_ldm_sd1):
    dm = DiffusionModel(tiny_ldm_sd1)
    enc = dm.text_encoders()[0]
    emb = TrainableEmbedding("zqtok", {"clip_l": torch.zeros(1, enc.width)})
    hook = PlaceholderEmbeddingHook([emb])
    hook.install(dm)
    try:
        first_word = hook.rewrite(["zqtok"])[0]
        # a caption that happens to contain that word gets another placeholder
        second = hook.rewrite([f"zqtok {first_word}"])[0].split()[0]
        assert second != first_word
    finally:
        hook.remove()
