"""The loop's contract with its driver (the webui glue): callbacks, previews in inference mode, LR reporting,
class-image weights, the base-prediction prior, and the seams for another injector and embedding hook."""
import pytest
import torch

from lib_tune.inject import Injector
from lib_tune.train.config import TrainConfig
from lib_tune.train.data import prepare_data
from lib_tune.train.embeddings import TextEmbeddingHook
from lib_tune.train.loop import Trainer, TrainerCallbacks, strip_trigger
from lib_tune.train.model import DiffusionModel
from lib_tune.train.optim import lr_factor
from tests.unit.train_fakes import FakeLDM, model_fingerprint, write_images


# (one torch thread: the session-wide fixture in tests/conftest.py)


def make(tmp_path, callbacks=None, **over):
    data = tmp_path / "data"
    if not data.exists():
        write_images(data)
    values = dict(dataset=str(data), method="lora", steps=6, output_name="fake", trigger="zzt", targets="attn",
                  network_dim=4, network_alpha=2.0, unet_lr=1e-2, train_text_encoder=False, resolution=64,
                  min_bucket=64, lr_scheduler="linear", warmup_steps=2)
    values.update(over)
    cfg = TrainConfig.from_dict(values)
    model = FakeLDM(seed=0)
    dm = DiffusionModel(model)
    return model, Trainer(cfg, dm, prepare_data(cfg, dm), callbacks)


def test_callbacks_previews_and_learning_rates(tmp_path):
    events = []

    class Recorder(TrainerCallbacks):
        trainer = None

        def on_step(self, step, total, loss, lr):
            events.append(("step", step, total, lr))

        def on_sample(self, step):
            t = self.trainer
            # previews run with the adapter merged for inference, the model in eval mode, without autograd
            events.append(("sample", step, t.injector.train, t.model.unet.training, torch.is_grad_enabled(),
                           bool(t.injector.touched)))

    rec = Recorder()
    model, trainer = make(tmp_path, rec, sample_every=3)
    rec.trainer = trainer
    before = model_fingerprint(model)
    result = trainer.run()
    steps = [e for e in events if e[0] == "step"]
    assert [(s, t) for _, s, t, _ in steps] == [(i, 6) for i in range(1, 7)]
    for _, step, _, lr in steps:  # the LR the step used (schedule factor of step-1)
        assert lr == pytest.approx(1e-2 * lr_factor("linear", step - 1, 6, 2))
    assert [e for e in events if e[0] == "sample"] == [("sample", 3, False, False, False, True),
                                                        ("sample", 6, False, False, False, True)]
    assert events.index(("sample", 3, False, False, False, True)) == 3  # right after step 3
    assert result.adapter_path is None and result.saved == []  # no output_dir: nothing written
    assert model_fingerprint(model) == before


def test_class_images_take_the_prior_weight(tmp_path):
    write_images(tmp_path / "class", n=2, caption="a square")
    losses = {}
    for weight in (0.0, 1.0):
        _, trainer = make(tmp_path / "w", prior="class_images", class_dir=str(tmp_path / "class"), batch_size=1,
                          prior_loss_weight=weight, lr_scheduler="constant", unet_lr=1e-9)
        trainer.run()
        losses[weight] = trainer.losses
        reg = [trainer.data.batch(i).is_reg.item() for i in range(6)]
    assert any(reg) and not all(reg)
    for i, is_reg in enumerate(reg):
        if is_reg:
            assert losses[0.0][i] == 0.0 and losses[1.0][i] > 0
        else:
            assert losses[0.0][i] == pytest.approx(losses[1.0][i], rel=1e-4)


def test_base_prediction_prior_runs_with_the_adapter_switched_off(tmp_path):
    calls = []

    class CountingInjector(Injector):
        def clear(self):
            calls.append("clear")
            super().clear()

    model, trainer = make(tmp_path, prior="base_prediction", class_prompt="a square")
    trainer.injector = CountingInjector()
    before = model_fingerprint(model)
    trainer.run()
    assert calls.count("clear") >= 6  # once per step for the target, once at the end
    assert model_fingerprint(model) == before
    assert strip_trigger("zzt, a red square", "zzt") == "a red square"
    assert strip_trigger("a photo of ZZT in a park", "zzt") == "a photo of  in a park"


def test_the_embedding_hook_is_a_seam(tmp_path):
    seen = []

    class GlueHook(TextEmbeddingHook):
        def __init__(self, embeddings):
            self.embeddings = embeddings

        def install(self, model):
            seen.append(("install", [e.token for e in self.embeddings]))

        def remove(self):
            seen.append(("remove",))

    class Boom(RuntimeError):
        pass

    class Fail(TrainerCallbacks):
        def on_step(self, step, total, loss, lr):
            raise Boom()

    # the fake's text encoder has no CLIP token table, so give the embedding vectors directly
    from lib_tune.train import loop

    data = tmp_path / "data"
    write_images(data)
    cfg = TrainConfig.from_dict(dict(dataset=str(data), method="pivotal", steps=3, output_name="fake", trigger="zzt",
                                     targets="attn", resolution=64, min_bucket=64, network_dim=4))
    dm = DiffusionModel(FakeLDM(seed=0))
    original = loop.init_embedding
    loop.init_embedding = lambda model, token, n, text: loop.TrainableEmbedding(token, {"clip_l": torch.zeros(n, 4)})
    try:
        trainer = Trainer(cfg, dm, prepare_data(cfg, dm), Fail(), text_hook_factory=GlueHook)
    finally:
        loop.init_embedding = original
    with pytest.raises(Boom):
        trainer.run()
    assert seen == [("install", ["zzt"]), ("remove",)]
    assert trainer.optimizer.param_groups[-1]["name"] == "emb"


@pytest.mark.parametrize("method, module, args", [
    ("lora", "networks.lora", {"preset": "attn"}),
    ("dora", "lycoris.kohya", {"algo": "lora", "dora_wd": "True", "preset": "attn"}),
    ("lokr", "lycoris.kohya", {"algo": "lokr", "factor": "-1", "preset": "attn"}),
])
def test_saved_file_metadata(tmp_path, method, module, args):
    import json

    from lib_tune.formats import addnet_hash, load_adapter

    _, trainer = make(tmp_path, output_dir=str(tmp_path / "out"), method=method, steps=2, save_dtype="bf16",
                      save_state=False)
    trainer.run_info = {"sd_model_name": "tiny", "clip_skip": 2, "not_a_field": 1}
    result = trainer.run()
    md = load_adapter(result.adapter_path).metadata
    assert md["ss_network_module"] == module and json.loads(md["ss_network_args"]) == args
    assert (md["ss_output_name"], md["ss_steps"], md["ss_max_train_steps"]) == ("fake", "2", "2")
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_v2"] == "False"
    assert md["ss_sd_model_name"] == "tiny" and md["ss_clip_skip"] == "2"
    assert md["ss_num_train_images"] == "4" and md["ss_resolution"] == "(64, 64)"
    assert json.loads(md["ss_tag_frequency"]) == {"data": {"zzt": 4, "a red square": 4}}
    assert md["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.01)"
    assert md["ss_lr_warmup_steps"] == "2" and md["ss_lr_scheduler"] == "linear"
    # kohya's precomputed hash is the webui's hash of the file as written
    assert md["sshs_model_hash"] == addnet_hash(result.adapter_path)
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora" and md["modelspec.trigger_phrase"] == "zzt"
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(result.adapter_path).values()} == {torch.bfloat16}


def test_step_context_leaves_the_model_plain_between_steps(tmp_path):
    """With a step_context (the webui's queue lock) the adapter is applied only inside each step, so a generation
    that runs between two steps sees the model without it; the losses equal a run without the context."""
    import contextlib
    seen = []

    class Glue(TrainerCallbacks):
        trainer = None

        @contextlib.contextmanager
        def step_context(self):
            seen.append(("enter", bool(self.trainer.injector.touched)))
            yield
            seen.append(("exit", bool(self.trainer.injector.touched)))

        def on_step(self, step, total, loss, lr):
            seen.append(("step", bool(self.trainer.injector.touched)))

    glue = Glue()
    _, trainer = make(tmp_path, glue)
    glue.trainer = trainer
    with_ctx = trainer.run().losses
    _, plain = make(tmp_path, None)
    assert with_ctx == plain.run().losses
    assert seen[:3] == [("enter", True), ("step", True), ("exit", False)]
    assert all(applied for kind, applied in seen if kind == "step")
    assert not any(applied for kind, applied in seen if kind == "exit")


def test_intermediate_files_have_their_own_output_name(tmp_path):
    from safetensors import safe_open
    _, trainer = make(tmp_path, None, save_every=3, output_dir=str(tmp_path / "out"))
    result = trainer.run()
    names = {}
    for path in result.saved:
        with safe_open(path, "pt") as f:
            names[path.rsplit("/", 1)[-1]] = f.metadata()["ss_output_name"]
    assert names == {"fake-step000003.safetensors": "fake-step000003", "fake.safetensors": "fake"}, names
