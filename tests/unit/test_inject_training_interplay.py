"""Training in the webui alternates with generations under the queue lock: a `<tune:>` generation between two
training steps merges its adapters into the model's weights in place and leaves them there (the runtime parks its
injector at the end of a generation). The next training step must never see them: the trainer's apply(train=True)
restores every in-place merge of any injector first. Checked on the fake LDM with the real Trainer: every training
forward sees the model's own weights, the losses equal those of a run without the generations, the model is
bit-identical afterwards, and the generation's injector merges again next time."""
import contextlib

import torch
from torch import nn

from lib_tune.inject import ActiveEntry, Injector, inplace
from lib_tune.train.loop import TrainerCallbacks
from tests.unit.test_inject_engine import entry
from tests.unit.test_inject_mapping import lora
from tests.unit.test_train_loop import make
from tests.unit.train_fakes import model_fingerprint


def _generation_set(model):
    """A LoRA on every Linear of the fake UNet (the layers the training adapter touches too)."""
    unet = model.model.diffusion_model
    return [ActiveEntry(entry(m, lora(m.weight.shape, rank=2, seed=i)), 0.7)
            for i, m in enumerate(x for x in unet.modules() if isinstance(x, nn.Linear))]


def _generate(model, injector, entries):
    """What a `<tune:>` txt2img does to the model: activate, run the UNet, deactivate (park)."""
    injector.apply(entries)
    with torch.no_grad():
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        out = model.apply_model(x, torch.tensor([500]), model.get_learned_conditioning(["a photo"]))
    injector.park()
    return out


def test_a_generation_between_training_steps_never_reaches_the_next_step(tmp_path):
    model, trainer = make(tmp_path)
    plain_losses = trainer.run().losses

    seen = []  # per training forward of a generation-touched layer: does it see the model's own weights?

    class Glue(TrainerCallbacks):
        @contextlib.contextmanager
        def step_context(self):  # the webui's queue lock: a generation runs before the step takes it
            outputs.append(_generate(model, runtime_injector, entries))
            assert inplace.merged_layers(), "the generation left its merge in place (parked)"
            yield

    model, trainer = make(tmp_path, Glue())
    entries = _generation_set(model)
    base = {m: m.weight.detach().clone() for m in (a.entry.module for a in entries)}
    runtime_injector, outputs = Injector(), []

    def check(module, _args):
        if trainer.injector.train and trainer.injector.layers:
            seen.append(torch.equal(module.weight, base[module]))

    hooks = [m.register_forward_pre_hook(check) for m in base]
    before = model_fingerprint(model)
    try:
        result = trainer.run()
    finally:
        for h in hooks:
            h.remove()
    assert result.losses == plain_losses  # bit for bit: the generations changed nothing in training
    assert seen and all(seen)
    assert len(outputs) == len(plain_losses) and all(torch.equal(o, outputs[0]) for o in outputs)
    assert not inplace.merged_layers() and model_fingerprint(model) == before
    # the runtime's injector was cleared by the trainer: its next generation merges again, with the same result
    computed = runtime_injector.computed
    assert torch.equal(_generate(model, runtime_injector, entries), outputs[0])
    assert runtime_injector.computed == computed + len(entries)
    runtime_injector.clear()
    assert model_fingerprint(model) == before
