"""Staged plans on the tiny fake model: config checks naming `stages[i].field`, per-stage module ownership, only
the current stage training (others' tensors unchanged, later stages not applied), the LR of each stage, one file
with the union of modules and mixed ranks, and exact resume within and across stage boundaries."""
import json
import os

import pytest
import torch

from lib_tune.formats import load_adapter
from lib_tune.train.config import ConfigError, TrainConfig
from lib_tune.train.data import prepare_data
from lib_tune.train.loop import Trainer, TrainerCallbacks
from lib_tune.train.model import DiffusionModel
from lib_tune.train.stages import stage_at
from lib_tune.train.state import load_state
from tests.unit.train_fakes import FakeLDM, model_fingerprint, write_images

CROSS = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_"
SELF = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_"
PLAN = [{"targets": "cross_attn", "steps": 6, "network_dim": 4, "network_alpha": 2.0, "unet_lr": 1e-2},
        {"targets": ["*_attn1_*", "*_ff_net_*"], "steps": 6, "network_dim": 2, "network_alpha": 1.0,
         "unet_lr": 3e-3, "name": "self+ff"}]


def job(tmp_path, out: str = "out", stages=PLAN, **over):
    data_dir = tmp_path / "data"
    if not data_dir.exists():
        write_images(data_dir)
    values = dict(dataset=str(data_dir), method="lora", output_name="fake", trigger="zzt",
                  output_dir=str(tmp_path / out), save_every=0, resolution=64, min_bucket=64,
                  lr_scheduler="constant", network_dim=8, network_alpha=4.0, unet_lr=1e-3,
                  train_text_encoder=False, batch_size=2, noise_offset=0.05, save_dtype="fp32", stages=stages)
    values.update(over)
    return TrainConfig.from_dict(values)


def trainer(cfg, model, callbacks=None):
    dm = DiffusionModel(model)
    return Trainer(cfg, dm, prepare_data(cfg, dm), callbacks)


def snapshot(adapter):
    return {k: v.detach().clone() for k, v in adapter.tensors().items()}


# ---- config ----------------------------------------------------------------------------------------------------
def test_steps_are_the_sum_of_the_stages(tmp_path):
    cfg = job(tmp_path)
    assert cfg.steps == 12 and cfg.stages == PLAN
    assert job(tmp_path, steps=12).steps == 12  # the same number given explicitly is fine
    with pytest.raises(ConfigError) as e:
        job(tmp_path, steps=100)
    assert e.value.field == "steps" and "12" in e.value.message
    base = dict(dataset="d", method="lora", output_name="o", trigger="t")
    with pytest.raises(ConfigError) as e:  # without stages steps stays required
        TrainConfig.from_dict(base)
    assert e.value.field == "steps"


@pytest.mark.parametrize("stages, field", [
    ([], "stages"),
    ("attn", "stages"),
    ([{"targets": "attn", "steps": 5}, "x"], "stages[1]"),
    ([{"steps": 5}], "stages[0].targets"),
    ([{"targets": "attn", "steps": 5}, {"targets": "nope", "steps": 5}], "stages[1].targets"),
    ([{"targets": "attn", "steps": 5}, {"targets": [], "steps": 5}], "stages[1].targets"),
    ([{"targets": "attn", "steps": 5}, {"targets": ["ok", ""], "steps": 5}], "stages[1].targets"),
    ([{"targets": 3, "steps": 5}], "stages[0].targets"),
    ([{"targets": "attn"}], "stages[0].steps"),
    ([{"targets": "attn", "steps": 0}], "stages[0].steps"),
    ([{"targets": "attn", "steps": 2.5}], "stages[0].steps"),
    ([{"targets": "attn", "steps": 5, "network_dim": 0}], "stages[0].network_dim"),
    ([{"targets": "attn", "steps": 5, "network_alpha": 0}], "stages[0].network_alpha"),
    ([{"targets": "attn", "steps": 5}, {"targets": "te", "steps": 5, "te_lr": -1}], "stages[1].te_lr"),
    ([{"targets": "attn", "steps": 5, "unet_lr": "fast"}], "stages[0].unet_lr"),
    ([{"targets": "attn", "steps": 5, "name": ""}], "stages[0].name"),
    ([{"targets": "attn", "steps": 5, "rank": 4}], "stages[0].rank"),
])
def test_config_errors_name_the_stage_field(tmp_path, stages, field):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict(dict(dataset="d", method="lora", output_name="o", trigger="t", steps=10,
                                   stages=stages))
    assert e.value.field == field, e.value


def test_stages_refuse_textual_inversion():
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict(dict(dataset="d", method="ti", output_name="t", trigger="t",
                                   stages=[{"targets": "attn", "steps": 5}]))
    assert e.value.field == "stages"


def test_model_dependent_errors_name_the_stage(tmp_path):
    model = FakeLDM(seed=0)
    bad = [PLAN[0], {"targets": ["lora_unet_nothing_*"], "steps": 3}]
    with pytest.raises(ConfigError) as e:
        trainer(job(tmp_path, stages=bad), model)
    assert e.value.field == "stages[1].targets" and "lora_unet_nothing_*" in e.value.message
    with pytest.raises(ConfigError) as e:  # the fake has no middle block
        trainer(job(tmp_path, stages=[{"targets": "mid_proj", "steps": 3}]), model)
    assert e.value.field == "stages[0].targets"
    with pytest.raises(ConfigError) as e:  # nothing new: attn2 belongs to stage 1 already
        trainer(job(tmp_path, stages=[PLAN[0], {"targets": ["*attn2*"], "steps": 3}]), model)
    assert e.value.field == "stages[1].targets" and "earlier stage" in e.value.message
    with pytest.raises(ConfigError) as e:
        trainer(job(tmp_path, stages=[{"targets": "attn", "steps": 3, "unet_lr": 0.0}]), model)
    assert e.value.field == "stages[0].unet_lr"


# ---- training --------------------------------------------------------------------------------------------------
class Recorder(TrainerCallbacks):
    def __init__(self):
        self.trainer = None
        self.snaps, self.lrs, self.stages, self.live, self.grads = [], [], [], [], []

    def on_stage(self, index, stage):
        self.stages.append((index, stage.name, stage.start, self.trainer.step))

    def on_step(self, step, total, loss, lr):
        t = self.trainer
        self.snaps.append(snapshot(t.adapter))
        self.lrs.append(lr)
        self.live.append(sorted({a.entry.key for a in t.injector_entries}))
        # per module: (requires_grad, has a gradient) of its parameters
        self.grads.append({k: {(p.requires_grad, p.grad is not None) for p in net.weights.values()
                               if isinstance(p, torch.nn.Parameter)} for k, net in t.adapter.modules.items()})


def test_each_stage_trains_only_its_modules(tmp_path):
    model = FakeLDM(seed=0)
    before = model_fingerprint(model)
    rec = Recorder()
    t = trainer(job(tmp_path), model, rec)
    rec.trainer = t
    applied = []
    real_apply = t.injector.apply

    def spy(entries, train=False):
        applied.append(sorted({a.entry.key for a in entries}))
        t.injector_entries = list(entries)
        return real_apply(entries, train=train)
    t.injector.apply = spy

    s1, s2 = t.plan
    assert set(s1.keys) == {CROSS + p for p in ("to_q", "to_k", "to_v", "to_out_0")}
    assert set(s2.keys) == {SELF + p for p in ("to_q", "to_k", "to_v", "to_out_0")} | {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"}
    assert set(t.adapter.modules) == set(s1.keys) | set(s2.keys)
    assert [stage_at(t.plan, i) for i in (0, 5, 6, 11, 12)] == [0, 0, 1, 1, 1]
    init = snapshot(t.adapter)

    result = t.run()
    assert model_fingerprint(model) == before and len(result.losses) == 12
    assert rec.stages == [(0, "cross_attn", 0, 0), (1, "self+ff", 6, 6)]
    # stage LRs (constant schedule): the first group's LR is the stage's unet_lr
    assert rec.lrs == [pytest.approx(1e-2)] * 6 + [pytest.approx(3e-3)] * 6
    # what was applied: stage 1 alone, then both (never stage 2's modules during stage 1)
    assert rec.live[:6] == [sorted(s1.keys)] * 6
    assert rec.live[6:] == [sorted(set(s1.keys) | set(s2.keys))] * 6

    def changed(a, b, keys):
        return {k for k in keys for n in a if n.startswith(k + ".") and not torch.equal(a[n], b[n])}
    # stage 1: its modules learn (lora_up leaves zero), stage 2's tensors stay at their initial values
    assert changed(init, rec.snaps[5], s1.keys) == set(s1.keys)
    assert not changed(init, rec.snaps[5], s2.keys)
    # stage 2: stage 1's tensors frozen at what they learned, stage 2's learn
    assert not changed(rec.snaps[5], rec.snaps[11], s1.keys)
    assert changed(rec.snaps[5], rec.snaps[11], s2.keys) == set(s2.keys)
    # who receives gradients: stage 1's modules only in stage 1; in stage 2 they are frozen with no (stale)
    # gradient left in them for the clipping to count
    assert all(rec.grads[i][k] == ({(True, True)} if k in s1.keys else {(False, False)})
               for i in range(6) for k in t.adapter.modules)
    assert all(rec.grads[i][k] == ({(True, True)} if k in s2.keys else {(False, False)})
               for i in range(6, 12) for k in t.adapter.modules)
    # after the run every tensor trains again (flags restored)
    assert all(p.requires_grad for p in t.adapter.parameters())


def test_later_stage_modules_do_not_act_before_their_stage(tmp_path):
    """Stage 2's modules made non-zero before the run must not change stage 1's losses: they are not applied."""
    def first_losses(perturb):
        model = FakeLDM(seed=0)

        class StopAt(TrainerCallbacks):
            def __init__(self):
                self.n = 0

            def on_step(self, step, total, loss, lr):
                self.n = step

            def should_stop(self):
                return self.n >= 6
        t = trainer(job(tmp_path, "p" if perturb else "q", save_on_stop=False), model, StopAt())
        if perturb:
            with torch.no_grad():
                g = torch.Generator().manual_seed(3)
                for key in t.plan[1].keys:
                    up = t.adapter.modules[key].weights["lora_up.weight"]
                    up.copy_(torch.randn(up.shape, generator=g))
        return t.run().losses

    plain, perturbed = first_losses(False), first_losses(True)
    assert len(plain) == 6
    assert perturbed == plain  # bit-for-bit: stage 2's modules are inert during stage 1

    # and the check can fail: the same perturbation on a stage-1 module changes the losses
    model = FakeLDM(seed=0)
    t = trainer(job(tmp_path, "r", stages=[PLAN[0]]), model)
    with torch.no_grad():
        t.adapter.modules[CROSS + "to_q"].weights["lora_up.weight"].add_(1.0)
    assert t.run().losses != plain


def test_one_file_with_the_union_and_mixed_ranks(tmp_path):
    model = FakeLDM(seed=0)
    cfg = job(tmp_path)
    result = trainer(cfg, model).run()
    a = load_adapter(result.adapter_path)
    assert set(a.modules) == {CROSS + p for p in ("to_q", "to_k", "to_v", "to_out_0")} | {
        SELF + p for p in ("to_q", "to_k", "to_v", "to_out_0")} | {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"}
    for key, net in a.modules.items():
        rank, alpha = (4, 2.0) if key.startswith(CROSS) else (2, 1.0)
        assert net.weights["lora_down.weight"].shape[0] == rank, key
        assert net.weights["lora_up.weight"].shape[1] == rank, key
        assert float(net.weights["alpha"]) == alpha, key
        assert float(net.weights["lora_up.weight"].abs().sum()) > 0, key  # every stage learned
    meta = a.metadata
    plan = json.loads(meta["ss_tune_stages"])
    assert [(s["name"], s["steps"], s["start"], s["network_dim"], s["unet_lr"]) for s in plan] == [
        ("cross_attn", 6, 0, 4, 1e-2), ("self+ff", 6, 6, 2, 3e-3)]
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 2.0
    assert meta["ss_max_train_steps"] == "12"


def test_resume_is_exact_within_and_across_stages(tmp_path):
    model = FakeLDM(seed=0)
    plan = [dict(PLAN[0]), dict(PLAN[1])]
    over = dict(stages=plan, lr_scheduler="cosine", warmup_ratio=0.34, save_every=3, keep_last=5,
                gradient_accumulation=2)
    full = trainer(job(tmp_path, "full", **over), model).run()
    assert len(full.losses) == 12

    cfg = job(tmp_path, "killed", **over)

    class Kill(RuntimeError):
        pass

    class KillAt(TrainerCallbacks):
        def on_step(self, step, total, loss, lr):
            if step == 11:
                raise Kill()
    with pytest.raises(Kill):
        trainer(cfg, model, KillAt()).run()
    states = os.path.join(cfg.output_dir, "fake-state")
    assert sorted(os.listdir(states)) == ["step-000003", "step-000006", "step-000009"]
    # the state at the boundary holds stage 1's optimizer (stage 2 starts with a fresh one at step 6)
    assert [load_state(os.path.join(states, s))["stage"] for s in sorted(os.listdir(states))] == [0, 0, 1]
    for step in (3, 6, 9):  # across the boundary, at it, inside stage 2
        rec = Recorder()
        t = trainer(cfg, model, rec)
        rec.trainer = t
        t.injector_entries = []
        assert t.resume(os.path.join(states, f"step-{step:06d}")) == step
        result = t.run()
        assert result.losses[step:] == pytest.approx(full.losses[step:], rel=1e-6, abs=1e-7), step
        assert full.losses[step] != full.losses[-1]
        assert rec.stages[0][0] == stage_at(t.plan, step)
    a, b = load_adapter(full.adapter_path), load_adapter(result.adapter_path)
    for key, net in a.modules.items():
        for p, v in net.weights.items():
            torch.testing.assert_close(b.modules[key].weights[p], v, rtol=1e-5, atol=1e-6)


def test_a_run_without_stages_is_unchanged(tmp_path):
    """No plan: one optimizer over every module, every module applied (the pre-existing behaviour)."""
    model = FakeLDM(seed=0)
    t = trainer(job(tmp_path, stages=None, steps=3, targets="attn_mlp"), model)
    assert t.plan == [] and t.stage is None
    n = sum(len(g["params"]) for g in t.optimizer.param_groups)
    assert n == len(t.adapter.parameters())
    assert len(t._entries()) == len(t.adapter.modules)
    assert len(t.run().losses) == 3


# ---- the job, its log and the progress read-out ------------------------------------------------------------------
def test_job_reports_and_logs_the_stage(tmp_path):
    from lib_tune.train.job import JobHooks, JobRegistry, run_job
    from lib_tune.ui.progress import progress_html

    cfg = job(tmp_path, save_every=3, keep_last=5)
    model = FakeLDM(seed=0)
    seen = []

    def on_step(j):
        seen.append((j.step, j.to_dict(full=False)["stage"]))
    reg = JobRegistry()
    j = reg.new({"stages": PLAN, "output_name": "fake", "method": "lora"})
    run_job(j, cfg, lambda c, cb: trainer(c, model, cb), JobHooks(on_step=on_step))
    assert j.state == "done", j.error
    assert seen[0] == (1, {"index": 0, "name": "cross_attn", "of": 2, "start": 0, "steps": 6, "step": 1})
    assert seen[5][1]["step"] == 6 and seen[5][1]["index"] == 0
    assert seen[6] == (7, {"index": 1, "name": "self+ff", "of": 2, "start": 6, "steps": 6, "step": 1})
    logs = [e.split(" ", 1)[1] for e in j.events]
    assert "stage 1/2 'cross_attn' started at step 0" in logs
    assert "stage 2/2 'self+ff' started at step 6" in logs
    h = progress_html(j.to_dict())
    assert "stage 2/2: <b>self+ff</b>" in h and "step 6 / 6 of this stage" in h
    assert "stage " not in progress_html(dict(j.to_dict(), stage=None)).replace("tune-stage", "")

    # resumed inside stage 2: the log says where it continues
    r = reg.new({"stages": PLAN})
    state = os.path.join(cfg.output_dir, "fake-state", "step-000009")
    run_job(r, cfg, lambda c, cb: trainer(c, model, cb), JobHooks(), resume_state=state)
    assert r.state == "done", r.error
    assert any(e.endswith("stage 2/2 'self+ff' (from step 6) continues at step 9") for e in r.events)
    assert r.to_dict()["stage"]["index"] == 1


@pytest.mark.parametrize("method", ["locon", "loha", "lokr", "dora", "pivotal"])
def test_every_network_method_trains_a_plan(tmp_path, method):
    from lib_tune.train import loop

    plan = [{"targets": "cross_attn", "steps": 2, "network_dim": 4}, {"targets": "full", "steps": 2,
                                                                       "network_dim": 2}]
    cfg = job(tmp_path, stages=plan, method=method, conv_dim=None, emb_lr=1e-2,
              preset="pivotal" if method == "pivotal" else "character", train_text_encoder=False, te_lr=1e-4)
    model = FakeLDM(seed=0)
    original = loop.init_embedding
    # the fake's text encoder has no CLIP token table: give the embedding vectors directly (as test_train_loop)
    loop.init_embedding = lambda model, token, n, text: loop.TrainableEmbedding(token, {"clip_l": torch.zeros(n, 4)})
    try:
        rec = Recorder()
        t = trainer(cfg, model, rec)
        rec.trainer = t
        t.injector_entries = []
    finally:
        loop.init_embedding = original
    s1, s2 = t.plan
    if method != "pivotal":  # the conv methods' "full" adds the ResBlock convolutions
        assert any("resnets" in k for k in s2.keys)
    assert not set(s1.keys) & set(s2.keys)
    groups = [g["name"] for g in t.optimizer.param_groups]
    assert groups == (["unet", "emb"] if method == "pivotal" else ["unet"])
    if method == "pivotal":  # the vectors train in every stage (the fake cannot run the TI hook: see test_train_loop)
        emb = t.optimizer.param_groups[1]["params"]
        t._build_stage_optimizer(1)
        assert [g["name"] for g in t.optimizer.param_groups] == ["unet", "emb"]
        assert t.optimizer.param_groups[1]["params"] == emb
        assert {id(p) for p in t.optimizer.param_groups[0]["params"]} == {
            id(p) for k in s2.keys for p in t.adapter.modules[k].weights.values() if isinstance(p, torch.nn.Parameter)}
        return
    result = t.run()
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    stage1 = [n for n in rec.snaps[0] if n.split(".", 1)[0] in s1.keys]
    stage2 = [n for n in rec.snaps[0] if n.split(".", 1)[0] in s2.keys]
    assert stage1 and stage2
    assert all(torch.equal(rec.snaps[1][n], rec.snaps[3][n]) for n in stage1)  # frozen in stage 2
    assert all(torch.equal(rec.snaps[0][n], rec.snaps[1][n]) for n in stage2)  # untouched in stage 1
    assert any(not torch.equal(rec.snaps[1][n], rec.snaps[3][n]) for n in stage2)
