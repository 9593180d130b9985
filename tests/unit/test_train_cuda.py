"""The CUDA paths of the trainer (skipped without a GPU): autocast in bf16 and fp16 (with the grad scaler) on a base
model stored in half precision, as the webui keeps it, with float32 adapter tensors; the base stays intact and a
resume continues the loss curve."""
import os

import pytest
import torch

from lib_tune.train.config import TrainConfig
from lib_tune.train.data import prepare_data
from lib_tune.train.loop import Trainer, TrainerCallbacks
from lib_tune.train.model import DiffusionModel
from tests.unit.train_fakes import FakeLDM, model_fingerprint, write_images

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class Kill(RuntimeError):
    pass


def job(tmp_path, out, precision, **over):
    data = tmp_path / "data"
    if not data.exists():
        write_images(data)
    values = dict(dataset=str(data), method="lora", steps=12, output_name="gpu", trigger="zzt",
                  output_dir=str(tmp_path / out), targets="full", network_dim=4, network_alpha=2.0, unet_lr=1e-2,
                  train_text_encoder=False, resolution=64, min_bucket=64, batch_size=2, mixed_precision=precision,
                  save_every=4, keep_last=5, save_dtype="bf16", min_snr_gamma=5.0)
    values.update(over)
    return TrainConfig.from_dict(values)


@pytest.mark.parametrize("precision, half", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_mixed_precision_on_a_half_precision_base(tmp_path, precision, half):
    model = FakeLDM(seed=0).to("cuda")
    model.model.to(half)  # the UNet in half precision, like the webui's; VAE and text encoder stay float32
    before = model_fingerprint(model)
    dm = DiffusionModel(model)
    assert dm.device.type == "cuda"

    def trainer(cfg, callbacks=None):
        return Trainer(cfg, dm, prepare_data(cfg, dm), callbacks)

    full = trainer(job(tmp_path, "full", precision))
    assert full.precision == half and (full.scaler is not None) == (half == torch.float16)
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in full.adapter.parameters())
    result = full.run()
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.losses[-1] < result.losses[0] * 1.5
    assert model_fingerprint(model) == before
    ups = [m.weights["lora_up.weight"] for m in full.adapter.modules.values()]
    assert any(float(u.detach().abs().sum()) > 0 for u in ups)

    class KillAt(TrainerCallbacks):
        def on_step(self, step, total, loss, lr):
            if step == 6:
                raise Kill()

    cfg = job(tmp_path, "killed", precision)
    with pytest.raises(Kill):
        trainer(cfg, KillAt()).run()
    assert model_fingerprint(model) == before
    again = trainer(cfg)
    assert again.resume(os.path.join(cfg.output_dir, "gpu-state", "step-000004")) == 4
    resumed = again.run()
    # GPU kernels may reorder reductions between runs: close, not bit-equal
    assert resumed.losses[4:] == pytest.approx(result.losses[4:], rel=2e-2, abs=1e-3)
    assert model_fingerprint(model) == before
