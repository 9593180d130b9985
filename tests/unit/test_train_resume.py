"""Save and resume on a tiny UNet-like model trained through the injection engine: the loss curve after a resume
equals the uninterrupted run's, files rotate, and the base model comes back intact from a run killed mid-way."""
import os

import pytest
import torch

from lib_tune.formats import load_adapter
from lib_tune.train.config import ConfigError, TrainConfig
from lib_tune.train.data import prepare_data
from lib_tune.train.loop import Trainer, TrainerCallbacks
from lib_tune.train.model import DiffusionModel
from lib_tune.train.state import load_state
from tests.unit.train_fakes import FakeLDM, model_fingerprint, write_images


class Kill(RuntimeError):
    pass


class KillAt(TrainerCallbacks):
    def __init__(self, step):
        self.at = step

    def on_step(self, step, total, loss, lr):
        if step == self.at:
            raise Kill(f"killed at {step}")


# (one torch thread: the session-wide fixture in tests/conftest.py)


def job(tmp_path, out: str, **over):
    data_dir = tmp_path / "data"
    if not data_dir.exists():
        write_images(data_dir)
    values = dict(dataset=str(data_dir), method="lora", steps=20, output_name="fake", trigger="zzt",
                  output_dir=str(tmp_path / out), save_every=5, keep_last=2, targets="attn_mlp", resolution=64,
                  min_bucket=64, lr_scheduler="cosine_with_restarts", lr_cycles=2, unet_lr=1e-2, network_dim=4,
                  network_alpha=2.0, train_text_encoder=False, batch_size=2, gradient_accumulation=2,
                  shuffle_caption=True, caption_dropout=0.2, flip_aug=True, noise_offset=0.05, min_snr_gamma=5.0,
                  save_dtype="fp32")
    values.update(over)
    return TrainConfig.from_dict(values)


def trainer(cfg, model, callbacks=None):
    dm = DiffusionModel(model)
    return Trainer(cfg, dm, prepare_data(cfg, dm), callbacks)


def test_resume_continues_exactly(tmp_path):
    model = FakeLDM(seed=0)
    before = model_fingerprint(model)

    full = trainer(job(tmp_path, "full"), model).run()
    assert len(full.losses) == 20 and not full.stopped
    assert model_fingerprint(model) == before

    cfg = job(tmp_path, "killed")
    with pytest.raises(Kill):
        trainer(cfg, model, KillAt(12)).run()
    assert model_fingerprint(model) == before  # intact after an exception mid-run
    states = sorted(os.listdir(os.path.join(cfg.output_dir, "fake-state")))
    assert states == ["step-000005", "step-000010"]
    assert sorted(os.listdir(cfg.output_dir)) == ["fake-state", "fake-step000005.safetensors",
                                                   "fake-step000010.safetensors"]

    resumed = trainer(cfg, model)
    assert resumed.resume(os.path.join(cfg.output_dir, "fake-state", "step-000010")) == 10
    result = resumed.run()
    assert model_fingerprint(model) == before
    assert result.steps_done == 20
    assert result.losses[:10] == pytest.approx(full.losses[:10], rel=0, abs=0)  # history carried over
    assert result.losses[10:] == pytest.approx(full.losses[10:], rel=1e-6, abs=1e-7)
    assert full.losses[-1] != full.losses[10]
    # and the final adapters agree (and did learn something: LoRA up matrices start at zero)
    a = load_adapter(full.adapter_path)
    assert any(float(net.weights["lora_up.weight"].abs().sum()) > 0 for net in a.modules.values())
    b = load_adapter(result.adapter_path)
    for key, net in a.modules.items():
        for p, t in net.weights.items():
            torch.testing.assert_close(b.modules[key].weights[p], t, rtol=1e-5, atol=1e-6)
    # rotation: only the last two intermediate files/states are kept, plus the final ones
    files = sorted(os.listdir(cfg.output_dir))
    assert files == ["fake-state", "fake-step000010.safetensors", "fake-step000015.safetensors",
                     "fake.safetensors"]
    assert sorted(os.listdir(os.path.join(cfg.output_dir, "fake-state"))) == ["step-000015", "step-000020"]


def test_resume_refuses_a_different_run(tmp_path):
    model = FakeLDM(seed=0)
    cfg = job(tmp_path, "a", steps=5, save_every=0)
    trainer(cfg, model).run()
    state = os.path.join(cfg.output_dir, "fake-state", "step-000005")
    assert load_state(state)["step"] == 5
    other = trainer(job(tmp_path, "a", steps=5, save_every=0, unet_lr=5e-3), model)
    with pytest.raises(ConfigError) as e:
        other.resume(state)
    assert e.value.field == "unet_lr"
    # fields that do not change the computation may differ
    trainer(job(tmp_path, "a", steps=5, save_every=3, keep_last=4), model).resume(state)
    with pytest.raises(ValueError, match="no training state"):
        other.resume(str(tmp_path / "nowhere"))


def test_should_stop_saves_and_leaves_the_model_intact(tmp_path):
    model = FakeLDM(seed=0)
    before = model_fingerprint(model)

    class StopAt(TrainerCallbacks):
        def __init__(self):
            self.calls, self.saved, self.steps = 0, [], []

        def should_stop(self):
            self.calls += 1
            return self.calls > 3

        def on_step(self, step, total, loss, lr):
            self.steps.append((step, total))

        def on_save(self, path):
            self.saved.append(path)

    cb = StopAt()
    cfg = job(tmp_path, "stop", save_every=0)
    result = trainer(cfg, model, cb).run()
    assert result.stopped and result.steps_done == 3 and cb.steps == [(1, 20), (2, 20), (3, 20)]
    assert cb.saved == [os.path.join(cfg.output_dir, "fake.safetensors")]
    assert load_adapter(cb.saved[0]).metadata["ss_steps"] == "3"
    assert model_fingerprint(model) == before
