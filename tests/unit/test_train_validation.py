"""Validation on held-out images: the split (deterministic, never class images, never trained on), the score
(fixed noise and timesteps: the same adapter scores the same), the best file, early stopping, resume with the
validation state, the job's read-out, and the config's checks."""
import contextlib
import os

import pytest
import torch

from lib_tune.train import loop as loop_module
from lib_tune.train.config import ConfigError, TrainConfig
from lib_tune.train.data import held_out_split, prepare_data
from lib_tune.train.dataset import DatasetConfig, discover
from lib_tune.train.job import Job, JobHooks, run_job
from lib_tune.train.loop import Trainer, TrainerCallbacks
from lib_tune.train.model import DiffusionModel
from lib_tune.train.validation import ValidationTracker, eval_mode, validation_loss, validation_timesteps
from tests.unit.train_fakes import FakeLDM, write_images

# (one torch thread: the session-wide fixture in tests/conftest.py)


def config(tmp_path, **over):
    data = tmp_path / "data"
    if not data.exists():
        write_images(data, n=6)
    values = dict(dataset=str(data), method="lora", steps=8, output_name="fake", trigger="zzt", targets="attn_mlp",
                  network_dim=4, network_alpha=2.0, unet_lr=1e-2, train_text_encoder=False, resolution=64,
                  min_bucket=64, lr_scheduler="constant", validation_count=2, validation_every=2)
    values.update(over)
    return TrainConfig.from_dict(values)


def trainer(cfg, callbacks=None, model=None):
    dm = DiffusionModel(model if model is not None else FakeLDM(seed=0))
    return Trainer(cfg, dm, prepare_data(cfg, dm), callbacks)


# ---- the split -------------------------------------------------------------------------------------------------
def test_split_is_deterministic_and_held_out_images_never_train(tmp_path):
    cfg = config(tmp_path, batch_size=2)
    dm = DiffusionModel(FakeLDM(seed=0))
    a, b = prepare_data(cfg, dm), prepare_data(cfg, dm)
    held = [it.path for it in a.val_items]
    assert len(held) == 2 and held == [it.path for it in b.val_items]
    train = {it.path for it in a.items}
    assert len(train) == 4 and not train & set(held)
    assert train | set(held) == {str(p) for p in (tmp_path / "data").glob("*.png")}
    seen = set()
    for i in range(3 * a.batches_per_epoch):  # three epochs of batches
        seen.update(a.batch(i).paths)
    assert seen == train
    # the validation set is exactly the held-out images, unaugmented, with their own indices
    vset = a.validation_set()
    assert sorted(p for bt in vset for p in bt.paths) == sorted(held)
    assert sorted(i for bt in vset for i in bt.ids) == [0, 1]
    # another seed holds out other images (some seed among a few does: the order is a hash of seed and path)
    others = {tuple(held_out_split(a.dataset, seed, count=2)) for seed in range(8)}
    assert len(others) > 1 and tuple(held) in others


def test_split_by_fraction_never_takes_class_images(tmp_path):
    write_images(tmp_path / "cls", n=4, caption="a square")
    cfg = config(tmp_path, validation_count=0, validation_split=0.5, prior="class_images",
                 class_dir=str(tmp_path / "cls"))
    data = prepare_data(cfg, DiffusionModel(FakeLDM(seed=0)))
    assert len(data.val_items) == 3 and not any(it.is_reg for it in data.val_items)
    assert all("/cls/" not in it.path for it in data.val_items)
    assert sum(not it.is_reg for it in data.items) == 3 and data.has_reg


def test_split_leaves_a_training_image(tmp_path):
    dm = DiffusionModel(FakeLDM(seed=0))
    with pytest.raises(ConfigError) as e:
        prepare_data(config(tmp_path, validation_count=6), dm)
    assert e.value.field == "validation_count"
    write_images(tmp_path / "one", n=1)
    ds = discover(DatasetConfig(train_dir=str(tmp_path / "one")))
    with pytest.raises(ConfigError) as e:
        held_out_split(ds, 0, split=0.5)
    assert e.value.field == "validation_split"
    assert held_out_split(ds, 0) == []


# ---- the score ------------------------------------------------------------------------------------------------
def test_timesteps_are_spread_over_the_schedule():
    assert validation_timesteps(4, 1000) == [125, 375, 625, 875]
    assert validation_timesteps(1, 1000) == [500]


def test_score_is_deterministic_and_independent_of_batching(tmp_path):
    dm = DiffusionModel(FakeLDM(seed=0))
    one = prepare_data(config(tmp_path, batch_size=1), dm).validation_set()
    two = prepare_data(config(tmp_path, batch_size=2), dm).validation_set()
    assert [len(b.paths) for b in one] == [1, 1] and [len(b.paths) for b in two] == [2]
    first = validation_loss(dm, one, seed=0, timesteps=4)
    assert validation_loss(dm, one, seed=0, timesteps=4) == first
    assert validation_loss(dm, two, seed=0, timesteps=4) == pytest.approx(first, rel=1e-6)
    assert validation_loss(dm, one, seed=1, timesteps=4) != first  # other noise
    assert validation_loss(dm, one, seed=0, timesteps=2) != first  # other timesteps


def test_the_same_adapter_scores_the_same(tmp_path):
    t = trainer(config(tmp_path, validation_every=0, steps=6))  # every 0: steps // 10 -> 1 here
    assert t.val_every == 1
    result = t.run()
    assert [s for s, _ in result.val_losses] == [1, 2, 3, 4, 5, 6]
    batches = t.data.validation_set()
    base = validation_loss(t.model, batches, 0, 4)
    t.injector.apply(t.adapter.entries(), train=True)
    try:
        with eval_mode(t.model.sd_model):
            a = validation_loss(t.model, batches, 0, 4)
            b = validation_loss(t.model, batches, 0, 4)
    finally:
        t.injector.clear()
    assert a == b == result.val_losses[-1][1]
    assert a != base  # the adapter is what is scored


def test_validation_runs_in_the_step_context_in_eval_mode_without_grad(tmp_path, monkeypatch):
    seen = []

    class Glue(TrainerCallbacks):
        inside = False

        @contextlib.contextmanager
        def step_context(self):
            self.inside = True
            yield
            self.inside = False

        def on_validation(self, step, loss, is_best):
            seen.append(("callback", step, is_best))

    glue = Glue()
    t = trainer(config(tmp_path, steps=5), glue)
    real = loop_module.validation_loss

    def spy(model, batches, seed, timesteps):
        seen.append(("score", glue.inside, torch.is_grad_enabled(), model.unet.training,
                     bool(t.injector.touched)))
        return real(model, batches, seed, timesteps)

    monkeypatch.setattr(loop_module, "validation_loss", spy)
    result = t.run()
    assert [s for s, _ in result.val_losses] == [2, 4, 5]  # every 2 steps and at the end
    scores = [e for e in seen if e[0] == "score"]
    assert scores == [("score", True, False, False, True)] * 3
    assert [e[1] for e in seen if e[0] == "callback"] == [2, 4, 5]


# ---- best file, early stopping ------------------------------------------------------------------------------------
def test_best_file_holds_the_best_step_and_says_so(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from lib_tune.formats import addnet_hash

    # a tiny LR: the validation loss barely moves, so with min_delta only the first score is a best
    cfg = config(tmp_path, unet_lr=1e-9, early_stopping_min_delta=1e-3, steps=6, output_dir=str(tmp_path / "out"),
                 save_every=2, keep_last=10, save_dtype="fp32")
    result = trainer(cfg).run()
    assert result.best_step == 2 and not result.early_stopped
    best = os.path.join(cfg.output_dir, "fake-best.safetensors")
    assert result.best_path == best and best in result.saved
    with safe_open(best, "pt") as f:
        md = f.metadata()
    assert md["ss_output_name"] == "fake-best"
    assert md["ss_tune_best_step"] == "2" and float(md["ss_tune_best_val_loss"]) == result.best_val_loss
    assert md["ss_steps"] == "2"
    assert md["sshs_model_hash"] == addnet_hash(best)
    at_best, final = load_file(best), load_file(result.adapter_path)
    step2 = load_file(os.path.join(cfg.output_dir, "fake-step000002.safetensors"))
    assert at_best.keys() == step2.keys()
    assert all(torch.equal(at_best[k], step2[k]) for k in at_best)
    assert any(not torch.equal(at_best[k], final[k]) for k in at_best)


def test_held_out_images_are_counted_as_kohya_counts_them(tmp_path):
    from safetensors import safe_open

    cfg = config(tmp_path, steps=2, output_dir=str(tmp_path / "out"))
    result = trainer(cfg).run()
    with safe_open(result.adapter_path, "pt") as f:
        md = f.metadata()
    assert (md["ss_num_train_images"], md["ss_num_validation_images"]) == ("4", "2")
    assert md["ss_validate_every_n_steps"] == "2" and md["ss_validation_seed"] == str(cfg.seed)


def test_keep_best_off_writes_no_best_file(tmp_path):
    cfg = config(tmp_path, steps=4, output_dir=str(tmp_path / "out"), keep_best=False)
    result = trainer(cfg).run()
    assert result.best_step == 4 and result.best_path is None
    assert sorted(os.listdir(cfg.output_dir)) == ["fake-state", "fake.safetensors"]


def test_early_stopping_stops_after_patience_scores_without_improvement(tmp_path):
    stops = []

    class Count(TrainerCallbacks):
        def on_step(self, step, total, loss, lr):
            stops.append(step)

    cfg = config(tmp_path, unet_lr=1e-9, early_stopping_min_delta=1e-3, early_stopping_patience=2, steps=20,
                 output_dir=str(tmp_path / "out"))
    result = trainer(cfg, Count()).run()
    # scores at 2 (best), 4 and 6 (no improvement of more than 1e-3): the run ends at 6 as a normal finish
    assert [s for s, _ in result.val_losses] == [2, 4, 6]
    assert result.early_stopped and not result.stopped and result.steps_done == 6 and stops[-1] == 6
    assert result.best_step == 2 and len(result.losses) == 6
    assert result.adapter_path == os.path.join(cfg.output_dir, "fake.safetensors")
    assert os.path.isfile(result.adapter_path)


def test_no_early_stop_while_the_validation_loss_improves(tmp_path):
    cfg = config(tmp_path, early_stopping_patience=1, steps=12)
    result = trainer(cfg).run()
    vals = [v for _, v in result.val_losses]
    assert vals == sorted(vals, reverse=True) and len(set(vals)) == len(vals)  # strictly improving here
    assert not result.early_stopped and result.steps_done == 12 and result.best_step == 12


def test_tracker_best_patience_and_min_delta():
    t = ValidationTracker(patience=2, min_delta=0.1)
    assert t.record(1, 1.0) and t.best_step == 1
    assert not t.record(2, 0.95) and t.bad == 1 and not t.should_stop  # not better by more than 0.1
    assert t.record(3, 0.5) and t.bad == 0 and t.best_step == 3
    assert not t.record(4, float("nan")) and not t.record(5, 0.45) and t.should_stop
    restored = ValidationTracker(patience=2, min_delta=0.1)
    restored.load(t.state())
    assert restored == t
    restored.load(t.state(), up_to=3)
    assert restored.losses == t.losses[:3]


# ---- resume ----------------------------------------------------------------------------------------------------
class Kill(RuntimeError):
    pass


def test_resume_with_validation_state_is_exact(tmp_path):
    class KillAt(TrainerCallbacks):
        def on_step(self, step, total, loss, lr):
            if step == 12:
                raise Kill()

    def cfg(out):
        return config(tmp_path, steps=20, validation_every=3, early_stopping_patience=50,
                      early_stopping_min_delta=1e-4, save_every=5, keep_last=5, batch_size=2,
                      gradient_accumulation=2, flip_aug=True, output_dir=str(tmp_path / out), save_dtype="fp32")

    model = FakeLDM(seed=0)
    full_trainer = trainer(cfg("full"), model=model)
    full = full_trainer.run()
    assert [s for s, _ in full.val_losses] == [3, 6, 9, 12, 15, 18, 20]
    with pytest.raises(Kill):
        trainer(cfg("killed"), KillAt(), model=model).run()
    resumed = trainer(cfg("killed"), model=model)
    assert resumed.resume(os.path.join(tmp_path / "killed", "fake-state", "step-000010")) == 10
    assert [s for s, _ in resumed.validation.losses] == [3, 6, 9]
    result = resumed.run()
    assert result.losses == pytest.approx(full.losses, rel=1e-6, abs=1e-7)
    assert [s for s, _ in result.val_losses] == [s for s, _ in full.val_losses]
    assert [v for _, v in result.val_losses] == pytest.approx([v for _, v in full.val_losses], rel=1e-6)
    assert result.best_step == full.best_step and resumed.validation.bad == full_trainer.validation.bad
    assert result.best_path == os.path.join(tmp_path / "killed", "fake-best.safetensors")


def test_resuming_an_early_stopped_run_stays_finished(tmp_path):
    cfg = config(tmp_path, unet_lr=1e-9, early_stopping_min_delta=1e-3, early_stopping_patience=2, steps=20,
                 output_dir=str(tmp_path / "out"))
    first = trainer(cfg).run()
    assert first.early_stopped and first.state_path
    again = trainer(cfg)
    assert again.resume(first.state_path) == 6
    result = again.run()
    assert result.steps_done == 6 and result.early_stopped and result.val_losses == first.val_losses


# ---- the job ---------------------------------------------------------------------------------------------------
def test_job_reports_validation_and_early_stopping(tmp_path):
    cfg = config(tmp_path, unet_lr=1e-9, early_stopping_min_delta=1e-3, early_stopping_patience=2, steps=20,
                 output_dir=str(tmp_path / "out"))
    job = Job(id="j1", config=cfg.to_dict())
    run_job(job, cfg, lambda c, cb: trainer(c, cb), JobHooks())
    d = job.to_dict()
    assert d["state"] == "done" and d["error"] is None, d["events"]
    assert [s for s, _ in d["val_losses"]] == [2, 4, 6] and d["best_step"] == 2 and d["early_stopped"]
    assert d["best_path"].endswith("fake-best.safetensors") and d["val_loss"] == d["val_losses"][-1][1]
    assert d["saved"].count(d["best_path"]) == 1
    text = "\n".join(d["events"])
    assert "(best)" in text and "validation loss" in text
    assert "early stopping at step 6: no improvement for 2 evaluations; best step 2" in text


# ---- config ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("over, field", [
    (dict(validation_split=0.6, validation_count=0), "validation_split"),
    (dict(validation_count=-1), "validation_count"),
    (dict(validation_count=1.5), "validation_count"),
    (dict(validation_timesteps=0), "validation_timesteps"),
    (dict(validation_every=-2), "validation_every"),
    (dict(early_stopping_patience=-1), "early_stopping_patience"),
    (dict(early_stopping_min_delta=-0.1), "early_stopping_min_delta"),
    (dict(keep_best="yes"), "keep_best"),
    (dict(validation_count=0, validation_every=5), "validation_every"),
    (dict(validation_count=0, validation_every=0, early_stopping_patience=3), "early_stopping_patience"),
])
def test_config_errors_name_the_field(tmp_path, over, field):
    with pytest.raises(ConfigError) as e:
        config(tmp_path, **over)
    assert e.value.field == field


def test_validation_interval_defaults_to_a_tenth_of_the_steps(tmp_path):
    assert config(tmp_path, validation_every=0, steps=100).validation_interval == 10
    assert config(tmp_path, validation_every=7, steps=100).validation_interval == 7
    assert config(tmp_path, validation_count=0, validation_every=0).validation_interval == 0
    assert config(tmp_path, validation_count=0, validation_split=0.2, validation_every=0,
                  steps=30).validation_interval == 3


def test_dataset_report_names_the_held_out_images(tmp_path):
    from lib_tune.train.job import dataset_report

    cfg = config(tmp_path)
    rep = dataset_report(cfg, 64)
    data = prepare_data(cfg, DiffusionModel(FakeLDM(seed=0)))
    assert rep["ok"] and rep["held_out"] == [it.path for it in data.val_items]
    assert "held_out" not in dataset_report(config(tmp_path, validation_count=0, validation_every=0), 64)
    with pytest.raises(ConfigError) as e:
        dataset_report(config(tmp_path, validation_count=6), 64)
    assert e.value.field == "validation_count"


def test_trainer_refuses_data_without_the_held_out_set(tmp_path):
    dm = DiffusionModel(FakeLDM(seed=0))
    plain = prepare_data(config(tmp_path, validation_count=0, validation_every=0), dm)
    with pytest.raises(ConfigError) as e:
        Trainer(config(tmp_path), dm, plain)
    assert e.value.field == "validation_count"
