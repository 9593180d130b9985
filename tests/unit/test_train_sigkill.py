"""A training process killed with SIGKILL (no exception handler, no finally) resumes from its last saved state:
at most one save interval is lost, the loss history and the final file equal an uninterrupted run's, and a kill
in the middle of writing a state or an adapter leaves nothing half-written that a resume or the Lora list would
pick up.

The run happens in a child process: `python -m tests.unit.test_train_sigkill MODE OUT` (the __main__ block below).
MODE "poll": the parent kills it once the state of step 2N exists; "state"/"adapter": the child SIGKILLs itself
halfway through writing the state / the intermediate adapter of step 3N (a real SIGKILL at the worst moment)."""
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lib_tune.formats import load_adapter
from lib_tune.train.config import TrainConfig
from lib_tune.train.data import prepare_data
from lib_tune.train.loop import Trainer, TrainerCallbacks
from lib_tune.train.model import DiffusionModel
from lib_tune.train.state import STATE_FILE, RunFiles, load_state
from tests.unit.train_fakes import FakeLDM, write_images

REPO = Path(__file__).resolve().parents[2]
STEPS, SAVE_EVERY = 30, 5
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")


def config(root: Path, out: str) -> TrainConfig:
    data = root / "data"
    if not data.exists():
        write_images(data)
    return TrainConfig.from_dict(dict(
        dataset=str(data), method="lora", steps=STEPS, output_name="fake", trigger="zzt", output_dir=str(root / out),
        save_every=SAVE_EVERY, keep_last=2, save_state=True, targets="attn_mlp", resolution=64, min_bucket=64,
        lr_scheduler="cosine", unet_lr=1e-2, network_dim=4, network_alpha=2.0, batch_size=2,
        gradient_accumulation=2, shuffle_caption=True, caption_dropout=0.2, flip_aug=True, noise_offset=0.05,
        save_dtype="fp32", seed=3))


def trainer(cfg: TrainConfig, callbacks=None) -> Trainer:
    dm = DiffusionModel(FakeLDM(seed=0))
    return Trainer(cfg, dm, prepare_data(cfg, dm), callbacks)


# ---- the child ---------------------------------------------------------------------------------------------------
class _Progress(TrainerCallbacks):
    """Appends each finished step to a file and slows the run down a little (a sleep computes nothing), so
    that the parent's kill lands mid-run."""

    def __init__(self, path: str, delay: float):
        self.path, self.delay = path, delay

    def on_step(self, step, total, loss, lr):
        with open(self.path, "a") as f:
            f.write(f"{step}\n")
            f.flush()
        time.sleep(self.delay)


def _die_halfway(write_whole, target):
    """Write half of what write_whole(buffer) produces to `target` (a path or an open file), then SIGKILL."""
    buf = io.BytesIO()
    write_whole(buf)
    data = buf.getvalue()
    if isinstance(target, (str, os.PathLike)):
        with open(target, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
    else:
        target.write(data[: len(data) // 2])
        target.flush()
        os.fsync(target.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def child(mode: str, root: str) -> None:
    torch.set_num_threads(1)  # the same arithmetic as the parent's in-process run
    cfg = config(Path(root), "killed")
    kill_step = 3 * SAVE_EVERY
    if mode == "state":
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("step") == kill_step and "optimizer" in obj:
                _die_halfway(lambda b: real_save(obj, b, *args, **kwargs), f)
            return real_save(obj, f, *args, **kwargs)

        torch.save = save
    elif mode == "adapter":
        import safetensors.torch as st
        real_save_file = st.save_file

        def save_file(tensors, filename, metadata=None):
            if f"-step{kill_step:06d}.safetensors" in os.path.basename(filename):
                _die_halfway(lambda b: b.write(st.save(tensors, metadata=metadata)), filename)
            return real_save_file(tensors, filename, metadata=metadata)

        st.save_file = save_file
    trainer(cfg, _Progress(os.path.join(root, "progress.txt"), 0.05 if mode == "poll" else 0.0)).run()


# ---- the parent --------------------------------------------------------------------------------------------------
def run_child(mode: str, root: Path, poll_for=None, timeout: float = 300.0):
    """Start the child; with poll_for (a path), SIGKILL it as soon as that path exists. Returns (returncode, the
    last step it reported)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "tests.unit.test_train_sigkill", mode, str(root)], cwd=str(REPO),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - t0 < timeout:
            if poll_for is not None and os.path.exists(poll_for):
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    out = proc.stdout.read().decode(errors="replace")
    proc.stdout.close()
    progress = root / "progress.txt"
    steps = [int(x) for x in progress.read_text().split()] if progress.exists() else []
    return rc, (steps[-1] if steps else 0), out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("sigkill-full")
    result = trainer(config(root, "full")).run()
    assert result.steps_done == STEPS and len(result.losses) == STEPS
    return result


def resume_and_check(root: Path, killed_at: int, full) -> RunFiles:
    cfg = config(root, "killed")
    ck = RunFiles(cfg.output_dir, cfg.output_name, cfg.state_dir, cfg.keep_last)
    latest = ck.latest_state()
    assert latest is not None
    t = trainer(cfg)
    resumed_at = t.resume(latest)
    # (a) at most one save interval lost
    assert resumed_at % SAVE_EVERY == 0 and resumed_at >= killed_at - SAVE_EVERY, (resumed_at, killed_at)
    result = t.run()
    assert result.steps_done == STEPS and not result.stopped
    # (b) the loss history (carried over, then recomputed) equals the uninterrupted run's, step by step
    assert len(result.losses) == STEPS
    for i, (a, b) in enumerate(zip(result.losses, full.losses)):
        assert abs(a - b) <= 1e-6, f"step {i + 1}: {a} != {b}"
    # (c) and so does the final file
    a, b = load_adapter(full.adapter_path), load_adapter(result.adapter_path)
    assert a.modules.keys() == b.modules.keys()
    for key, net in a.modules.items():
        for p, tensor in net.weights.items():
            torch.testing.assert_close(b.modules[key].weights[p], tensor, rtol=1e-5, atol=1e-6)
    # (d) nothing half-written is left, and every intermediate file and state that is there reads
    assert ck.leftovers() == []
    for name in os.listdir(cfg.output_dir):
        assert not name.endswith(".tmp") and not name.startswith("."), name
        if name.endswith(".safetensors"):
            load_adapter(os.path.join(cfg.output_dir, name))
    for step in ck.state_steps():
        assert load_state(ck.state_path(step))["step"] == step
    return ck


def test_sigkill_mid_run_loses_at_most_one_interval(tmp_path, uninterrupted):
    cfg = config(tmp_path, "killed")
    ck = RunFiles(cfg.output_dir, cfg.output_name, cfg.state_dir, cfg.keep_last)
    rc, killed_at, out = run_child("poll", tmp_path, poll_for=os.path.join(ck.state_path(2 * SAVE_EVERY),
                                                                           STATE_FILE))
    assert rc == -signal.SIGKILL, out
    assert 2 * SAVE_EVERY <= killed_at < STEPS, (killed_at, out)
    assert not os.path.exists(ck.adapter_path())  # it never finished
    resume_and_check(tmp_path, killed_at, uninterrupted)


def test_sigkill_while_writing_a_state(tmp_path, uninterrupted):
    cfg = config(tmp_path, "killed")
    ck = RunFiles(cfg.output_dir, cfg.output_name, cfg.state_dir, cfg.keep_last)
    rc, killed_at, out = run_child("state", tmp_path)
    assert rc == -signal.SIGKILL and killed_at == 3 * SAVE_EVERY, (rc, killed_at, out)
    # the half state lies in a temporary folder: unreadable, and never taken for a state
    half = [n for n in os.listdir(ck.state_dir) if n.startswith(".tmp-")]
    assert len(half) == 1
    with pytest.raises(ValueError):
        load_state(os.path.join(ck.state_dir, half[0]))
    assert ck.state_steps() == [SAVE_EVERY, 2 * SAVE_EVERY]
    assert ck.latest_state() == ck.state_path(2 * SAVE_EVERY)
    assert ck.leftovers() == [os.path.join(ck.state_dir, half[0])]
    resume_and_check(tmp_path, killed_at, uninterrupted)


def test_sigkill_while_writing_an_adapter(tmp_path, uninterrupted):
    cfg = config(tmp_path, "killed")
    ck = RunFiles(cfg.output_dir, cfg.output_name, cfg.state_dir, cfg.keep_last)
    rc, killed_at, out = run_child("adapter", tmp_path)
    assert rc == -signal.SIGKILL and killed_at == 3 * SAVE_EVERY, (rc, killed_at, out)
    half = [n for n in os.listdir(cfg.output_dir) if n.endswith(".tmp")]
    assert len(half) == 1 and half[0].startswith(".fake-step000015.safetensors.")
    assert ck.adapter_steps() == [SAVE_EVERY, 2 * SAVE_EVERY]  # the half file is not an adapter
    assert not os.path.exists(ck.adapter_path(3 * SAVE_EVERY))
    assert ck.latest_state() == ck.state_path(2 * SAVE_EVERY)
    resume_and_check(tmp_path, killed_at, uninterrupted)


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2])


def test_leftovers_of_dead_writers_include_the_best_file_and_spare_live_ones(tmp_path):
    from lib_tune.train.state import RunFiles

    ck = RunFiles(str(tmp_path), "fake")
    dead = 2 ** 22 + 12345  # above Linux's default pid_max: no such process
    names = [f".fake-best.safetensors.{dead}.0a1b2c3d.tmp", f".fake-step000004.safetensors.{dead}.0a1b2c3d.tmp",
             f".fake.safetensors.{dead}.0a1b2c3d.tmp", f".fake-best.safetensors.{os.getpid()}.0a1b2c3d.tmp",
             f".other-best.safetensors.{dead}.0a1b2c3d.tmp"]
    for n in names:
        (tmp_path / n).write_bytes(b"half")
    assert ck.leftovers() == sorted(str(tmp_path / n) for n in names[:3])
