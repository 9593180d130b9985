"""Trainable adapters on a tiny UNet-like model: layer presets, kohya names that map back, initial deltas of zero,
files that load back through the readers and the engine with the same numbers, and the model session."""
import pytest
import torch

from lib_tune.formats import load_adapter, save_adapter
from lib_tune.inject import Injector, activate, map_adapter
from lib_tune.train.methods import MethodSpec, create_adapter, select_targets
from lib_tune.train.model import DiffusionModel
from tests.unit.train_fakes import FakeLDM, model_fingerprint

NETWORKS = ("lora", "locon", "loha", "lokr", "dora")


@pytest.fixture()
def dm():
    return DiffusionModel(FakeLDM(seed=0))


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    ctx = torch.randn(2, 16, 12, generator=g)
    return x, t, ctx


def test_presets_select_the_right_layers(dm):
    def layers(preset, conv):
        return {t.layer.split("transformer_blocks_0_")[-1].split("input_blocks_1_")[-1]
                for t in select_targets(dm.targets, preset, False, conv)}

    attn = {f"{a}_{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out_0")}
    assert layers("attn", False) == attn
    assert layers("attn_mlp", False) == attn | {"ff_net_0_proj", "ff_net_2"}
    assert layers("full", False) == attn | {"ff_net_0_proj", "ff_net_2", "1_proj_in", "1_proj_out"}
    assert layers("full", True) == layers("full", False) | {"0_in_layers_2", "0_out_layers_3", "0_emb_layers_1"}
    with pytest.raises(ValueError, match="unknown targets preset"):
        select_targets(dm.targets, "most", False, False)


def test_kohya_names(dm):
    keys = {t.layer: t.key for t in select_targets(dm.targets, "full", False, True)}
    assert keys["diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_q"] == \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert keys["diffusion_model_input_blocks_1_0_in_layers_2"] == "lora_unet_down_blocks_0_resnets_0_conv1"
    assert keys["diffusion_model_input_blocks_1_0_emb_layers_1"] == "lora_unet_down_blocks_0_resnets_0_time_emb_proj"


@pytest.mark.parametrize("method", NETWORKS)
def test_initial_delta_is_zero_and_gradients_reach_the_adapter(dm, method):
    adapter = create_adapter(dm.targets, MethodSpec(method=method, preset="full", dim=4, alpha=2.0, seed=1))
    assert all(p.dtype == torch.float32 for p in adapter.parameters())
    x, t, ctx = inputs()
    base = dm.predict(x, t, ctx)
    inj = Injector()
    with dm.session():
        inj.apply(adapter.entries(), train=True)
        try:
            y = dm.predict(x, t, ctx)
            assert torch.allclose(y, base, atol=1e-5), (method, float((y - base).abs().max()))
            y.square().mean().backward()
        finally:
            inj.clear()
    grads = [p.grad for p in adapter.parameters()]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)
    assert all(not p.requires_grad or p.grad is None for p in dm.sd_model.parameters())


def test_dora_scale_is_per_input_channel(dm):
    adapter = create_adapter(dm.targets, MethodSpec(method="dora", preset="attn", dim=2, alpha=1.0))
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    w = dm.targets["diffusion_model_input_blocks_1_1_transformer_blocks_0_attn2_to_k"].weight
    scale = adapter.modules[key].weights["dora_scale"]
    assert scale.shape == (1, w.shape[1])
    torch.testing.assert_close(scale[0], w.norm(dim=0))


@pytest.mark.parametrize("method", NETWORKS)
def test_saved_file_loads_back_with_the_same_numbers(dm, tmp_path, method):
    adapter = create_adapter(dm.targets, MethodSpec(method=method, preset="full", dim=4, alpha=3.0, seed=2))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # make every delta non-zero
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    x, t, ctx = inputs(1)
    inj = Injector()
    inj.apply(adapter.entries(), train=True)
    with torch.no_grad():
        live = dm.predict(x, t, ctx)
    inj.clear()
    base = dm.predict(x, t, ctx)
    assert not torch.allclose(live, base, atol=1e-4)

    path = str(tmp_path / f"{method}.safetensors")
    save_adapter(path, adapter.tensors())
    loaded = load_adapter(path)
    assert set(loaded.modules) == set(adapter.modules) and not loaded.unplaced
    mapped = map_adapter(loaded, dm.targets)
    assert mapped.n_mapped == len(adapter.modules) and not mapped.unmapped
    inj.apply(activate(mapped), train=False)
    try:
        with torch.no_grad():
            again = dm.predict(x, t, ctx)
    finally:
        inj.clear()
    torch.testing.assert_close(again, live, rtol=1e-4, atol=1e-5)


def test_load_tensors_checks_the_layout(dm):
    a = create_adapter(dm.targets, MethodSpec(method="lora", preset="attn", dim=4, alpha=2.0, seed=0))
    b = create_adapter(dm.targets, MethodSpec(method="lora", preset="attn", dim=4, alpha=2.0, seed=9))
    a.load_tensors(b.tensors())
    assert all(torch.equal(a.tensors()[k], v) for k, v in b.tensors().items())
    with pytest.raises(ValueError, match="does not match"):
        a.load_tensors({k: v for k, v in b.tensors().items() if "attn1" not in k})


def test_session_restores_flags_modes_and_attributes_even_on_errors():
    model = FakeLDM(seed=0)
    # an unusual starting point: some parameters trainable, some modules in train mode
    model.model.diffusion_model.out.requires_grad_(True)
    model.first_stage_model.requires_grad_(False)
    model.model.diffusion_model.input_blocks[1][1].train()
    model.cond_stage_model.device = "cuda"
    before = model_fingerprint(model)
    dm = DiffusionModel(model)
    block = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0]
    with pytest.raises(RuntimeError, match="boom"):
        with dm.session(train_unet=True, train_text=True, gradient_checkpointing=True):
            assert not any(p.requires_grad for p in model.parameters())
            assert block.checkpoint is False and "forward" in block.__dict__
            assert model.model.diffusion_model.training and model.cond_stage_model.training
            assert not model.first_stage_model.training
            raise RuntimeError("boom")
    assert model_fingerprint(model) == before
    assert "forward" not in block.__dict__ and block.checkpoint is True


def test_gradient_checkpointing_gives_the_same_gradients(dm):
    adapter = create_adapter(dm.targets, MethodSpec(method="lora", preset="full", dim=4, alpha=2.0, seed=4))
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.01)
    x, t, ctx = inputs(2)
    inj = Injector()
    grads = []
    for gc in (False, True):
        for p in adapter.parameters():
            p.grad = None
        with dm.session(gradient_checkpointing=gc):
            inj.apply(adapter.entries(), train=True)
            try:
                dm.predict(x, t, ctx).square().mean().backward()
            finally:
                inj.clear()
        grads.append([p.grad.clone() for p in adapter.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
