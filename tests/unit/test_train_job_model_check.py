"""run_job checks at each step (inside the host's step context) that the host still has the model the trainer was
built on: a model swapped under a running job fails it with a readable message, leaving the old model intact,
instead of training an object the host no longer uses."""
from lib_tune.train.config import TrainConfig
from lib_tune.train.data import prepare_data
from lib_tune.train.job import JobHooks, JobRegistry, run_job
from lib_tune.train.loop import Trainer
from lib_tune.train.model import DiffusionModel
from tests.unit.train_fakes import FakeLDM, model_fingerprint, write_images


class Named(FakeLDM):
    def __init__(self, title, seed=0):
        super().__init__(seed=seed)
        self.sd_checkpoint_info = type("Info", (), {"title": title})()


def run(tmp_path, swap_after=None):
    write_images(tmp_path / "data")
    cfg = TrainConfig.from_dict(dict(dataset=str(tmp_path / "data"), method="lora", steps=6, output_name="m",
                                     trigger="zzt", output_dir=str(tmp_path / "out"), resolution=64, min_bucket=64,
                                     network_dim=2, network_alpha=1.0, train_text_encoder=False))
    a, b = Named("a.safetensors [aaaa]"), Named("b.safetensors [bbbb]", seed=1)
    before = model_fingerprint(a)
    calls = []

    def current():
        calls.append(1)
        return b if swap_after is not None and len(calls) > swap_after else a

    def make_trainer(cfg, callbacks):
        dm = DiffusionModel(a)
        return Trainer(cfg, dm, prepare_data(cfg, dm), callbacks)

    job = JobRegistry().new(cfg.to_dict())
    run_job(job, cfg, make_trainer, JobHooks(current_model=current))
    return job, a, before


def test_a_swapped_model_fails_the_job_readably(tmp_path):
    job, model, before = run(tmp_path, swap_after=3)  # the check after make_trainer, then steps 1 and 2
    assert job.state == "failed" and job.step == 2, (job.state, job.step, job.error)
    assert "the loaded checkpoint changed during training (from a.safetensors [aaaa] to b.safetensors [bbbb])" \
        in job.error
    assert any("failed: the loaded checkpoint changed" in e for e in job.events)
    assert model_fingerprint(model) == before  # the model it trained on is restored


def test_the_same_model_trains_to_the_end(tmp_path):
    job, model, before = run(tmp_path)
    assert job.state == "done" and job.step == 6 and job.error is None
    assert model_fingerprint(model) == before


def test_a_stop_during_preparation_ends_the_job_interrupted(tmp_path):
    from lib_tune.train.job import Stopped

    def make_trainer(cfg, callbacks):
        raise Stopped("stopped while generating class images (1 of 2 written)")

    write_images(tmp_path / "data")
    cfg = TrainConfig.from_dict(dict(dataset=str(tmp_path / "data"), method="lora", steps=6, output_name="m",
                                     trigger="zzt"))
    ended = []
    job = JobRegistry().new(cfg.to_dict())
    run_job(job, cfg, make_trainer, JobHooks(on_end=ended.append))
    assert job.state == "interrupted" and job.error is None and ended == [job]
    assert any("interrupted: stopped while generating class images" in e for e in job.events)
