"""Saving adapters and training states (a training state is what a resume needs: the adapter's tensors, the
optimizer, the step, the RNG; "checkpoint" in this package means the SD model file the webui loads).

Files (kohya's naming, so users find their way):
- `<output_dir>/<name>.safetensors`: the final adapter (also written when a run is stopped);
- `<output_dir>/<name>-step000100.safetensors`: intermediate adapters, the last `keep_last` kept;
- `<state_dir>/step-000100/trainer_state.bin`: what a resume needs, the last `keep_last` kept (state_dir defaults
  to `<output_dir>/<name>-state`). The `.bin` extension keeps it out of the webui's Lora list, which picks up
  .safetensors/.pt/.ckpt files in sub-folders too.

Adapters are written atomically by formats.write.save_adapter (temporary file + rename), in the chosen dtype,
with kohya's ss_* / sshs_* / modelspec metadata (run_metadata.py). A state folder is written into a temporary
sibling and renamed into place, so a crash mid-save leaves the previous states intact and never a half state;
what a killed process leaves behind (temporary folders and files) is never read and is removed by the next prune
(tests/unit/test_train_sigkill.py kills a training process mid-run and mid-write).

The state holds the adapter's tensors in float32 (the saved file may be fp16), the optimizer, scheduler and
grad-scaler states, the step and data position, Python's and torch's RNG states, the loss history and the
config; it is read back with torch.load(weights_only=True): no pickled code. The noise/timestep generators need
no saved state: each micro-batch's generator is seeded from (seed, batch index) (loop.step_generator), and the
data position is that index, so the state's step says where both continue.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import uuid
from typing import Dict, List, Optional

import torch

from ..formats.write import save_adapter

FORMAT = "sd-webui-tune-state/1"
STATE_FILE = "trainer_state.bin"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_STEP_DIR = re.compile(r"^step-(\d+)$")


def cast_for_saving(tensors: Dict[str, torch.Tensor], dtype: str) -> Dict[str, torch.Tensor]:
    """CPU, contiguous, floating tensors in the save dtype (kohya casts alpha too)."""
    dt = DTYPES[dtype]
    return {k: (v.detach().to("cpu", dt) if v.is_floating_point() else v.detach().cpu()).contiguous()
            for k, v in tensors.items()}


def write_adapter_file(path: str, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_adapter(path, tensors, metadata)
    return path


def capture_rng() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RunFiles:
    """Paths and rotation of the files one run saves: its intermediate adapters and its training states."""

    def __init__(self, output_dir: str, output_name: str, state_dir: Optional[str] = None, keep_last: int = 3):
        self.output_dir = output_dir
        self.output_name = output_name
        self.state_dir = state_dir or os.path.join(output_dir, f"{output_name}-state")
        self.keep_last = max(1, int(keep_last))

    def adapter_path(self, step: Optional[int] = None) -> str:
        suffix = "" if step is None else f"-step{step:06d}"
        return os.path.join(self.output_dir, f"{self.output_name}{suffix}.safetensors")

    def state_path(self, step: int) -> str:
        return os.path.join(self.state_dir, f"step-{step:06d}")

    def write_state(self, step: int, payload: dict) -> str:
        final = self.state_path(step)
        os.makedirs(self.state_dir, exist_ok=True)
        tmp = os.path.join(self.state_dir, f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
        try:
            with open(os.path.join(tmp, STATE_FILE), "wb") as f:
                torch.save(dict(payload, format=FORMAT), f)
                f.flush()
                os.fsync(f.fileno())
            if os.path.exists(final):  # the same step saved again (after a resume): replace it
                old = final + f".old-{uuid.uuid4().hex[:8]}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    def state_steps(self) -> List[int]:
        if not os.path.isdir(self.state_dir):
            return []
        steps = []
        for name in os.listdir(self.state_dir):
            m = _STEP_DIR.match(name)
            if m and os.path.isfile(os.path.join(self.state_dir, name, STATE_FILE)):
                steps.append(int(m[1]))
        return sorted(steps)

    def latest_state(self) -> Optional[str]:
        steps = self.state_steps()
        return self.state_path(steps[-1]) if steps else None

    def adapter_steps(self) -> List[int]:
        if not os.path.isdir(self.output_dir):
            return []
        rx = re.compile(re.escape(self.output_name) + r"-step(\d+)\.safetensors$")
        return sorted(int(m[1]) for m in (rx.match(n) for n in os.listdir(self.output_dir)) if m)

    def leftovers(self) -> List[str]:
        """What a process killed mid-save left behind: temporary state folders (`.tmp-PID-*`), a replaced state
        (`step-N.old-*`) and temporary adapter files (`.NAME[-stepN|-best].safetensors.PID.*.tmp`) of processes that are no
        longer alive. None of them is ever read (state_steps / adapter_steps match only complete names)."""
        out = []
        if os.path.isdir(self.state_dir):
            for name in os.listdir(self.state_dir):
                m = re.match(r"^\.tmp-(\d+)-[0-9a-f]+$", name)
                if (m and not _alive(int(m[1]))) or re.match(r"^step-\d+\.old-[0-9a-f]+$", name):
                    out.append(os.path.join(self.state_dir, name))
        if os.path.isdir(self.output_dir):
            rx = re.compile(r"^\." + re.escape(self.output_name)
                            + r"(-step\d+|-best)?\.safetensors\.(\d+)\.[0-9a-f]+\.tmp$")
            for name in os.listdir(self.output_dir):
                m = rx.match(name)
                if m and not _alive(int(m[2])):
                    out.append(os.path.join(self.output_dir, name))
        return sorted(out)

    def prune(self) -> List[str]:
        """Delete all but the newest `keep_last` intermediate adapters and states, and the leftovers of killed
        runs; returns what was removed."""
        removed = []
        for path in self.leftovers():
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    continue
            removed.append(path)
        for step in self.adapter_steps()[:-self.keep_last]:
            path = self.adapter_path(step)
            os.unlink(path)
            removed.append(path)
        for step in self.state_steps()[:-self.keep_last]:
            path = self.state_path(step)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        return removed


#: the old name, kept only for train/loop.py until its rewrite imports RunFiles; remove then
Checkpoints = RunFiles


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def load_state(path: str) -> dict:
    """A state folder (or its trainer_state.bin) -> the payload. Raises ValueError for anything else."""
    file = os.path.join(path, STATE_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ValueError(f"no training state at {path}")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same error for the caller
        raise ValueError(f"cannot read training state {file}: {e}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{file} is not a sd-webui-tune training state")
    return payload
