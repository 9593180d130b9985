"""Validation loss on held-out images, and what the trainer does with it (the best file, early stopping).

The score: the mean plain denoising loss (MSE against the model's own target, eps or v; no min-SNR weighting,
no noise offset) over every held-out image (data.TrainingData.validation_set: center-cropped, unaugmented, the
caption as written) at `timesteps` fixed timesteps evenly spread over the schedule ((k + 1/2) T / K), with
noise from a generator seeded by (seed, "validation", image index, k). Every draw is a function of those
numbers alone, so the same adapter always scores the same, two adapters are compared on the same noise, and
the score does not depend on how the images are batched. The trainer calls it with the adapter applied, the
model in eval mode and no autograd, inside its per-step context (the webui's queue lock).

ValidationTracker keeps the history and decides: an evaluation is the new best when it is lower than the best
so far by more than `min_delta`; after `patience` evaluations in a row that are not, the run stops early
(patience 0: never). Its state goes into the trainer's resume state, so a resumed run decides exactly as an
uninterrupted one.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .objective import add_noise, per_sample_mse, sample_noise, target_for


def validation_timesteps(count: int, num_timesteps: int = 1000) -> List[int]:
    """`count` integer timesteps evenly spread over [0, num_timesteps): the centres of equal intervals."""
    count = max(1, int(count))
    return [min(num_timesteps - 1, int((k + 0.5) * num_timesteps / count)) for k in range(count)]


def validation_generator(seed: int, image: int, k: int) -> torch.Generator:
    """The noise generator of held-out image `image` at its k-th timestep."""
    digest = hashlib.sha256(f"{int(seed)}:validation:{int(image)}:{int(k)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))


@torch.no_grad()
def validation_loss(model, batches: Sequence[Any], seed: int, timesteps: int = 4) -> float:
    """The mean denoising loss of `batches` (data.Batch with ids, from TrainingData.validation_set) under
    `model` (a DiffusionModel, with whatever adapter is applied). NaN when there is nothing to score."""
    ts = validation_timesteps(timesteps, model.num_timesteps)
    total, n = 0.0, 0
    for batch in batches:
        latents = batch.latents
        ids = batch.ids if batch.ids is not None else list(range(latents.shape[0]))
        cond = model.encode_text(batch.captions, batch.size_cond)
        for k, t_value in enumerate(ts):
            noise = torch.cat([sample_noise(latents[j:j + 1], validation_generator(seed, image, k))
                               for j, image in enumerate(ids)])
            t = torch.full((latents.shape[0],), t_value, dtype=torch.long, device=latents.device)
            x_t = add_noise(latents, noise, t, model.alphas_cumprod)
            target = target_for(model.prediction_type, latents, noise, t, model.alphas_cumprod)
            total += float(per_sample_mse(model.predict(x_t, t, cond), target).double().sum())
            n += latents.shape[0]
    return total / n if n else float("nan")


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Every submodule in eval mode, and each one's own mode back afterwards (module.train() may be disabled)."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        for m, _ in modes:
            m.training = False
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@dataclass
class ValidationTracker:
    """History of validation scores, the best one, and the early-stopping count."""
    patience: int = 0
    min_delta: float = 0.0
    losses: List[Tuple[int, float]] = field(default_factory=list)
    best_step: Optional[int] = None
    best_loss: Optional[float] = None
    #: evaluations in a row without an improvement of more than min_delta
    bad: int = 0

    def record(self, step: int, loss: float) -> bool:
        """Add a score; True when it is the new best."""
        loss = float(loss)
        self.losses.append((int(step), loss))
        improved = math.isfinite(loss) and (self.best_loss is None or loss < self.best_loss - self.min_delta)
        if improved:
            self.best_step, self.best_loss, self.bad = int(step), loss, 0
        else:
            self.bad += 1
        return improved

    @property
    def last_step(self) -> Optional[int]:
        return self.losses[-1][0] if self.losses else None

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.bad >= self.patience

    def state(self) -> Dict[str, Any]:
        return {"losses": [[s, v] for s, v in self.losses], "best_step": self.best_step,
                "best_loss": self.best_loss, "bad": self.bad}

    def load(self, state: Dict[str, Any], up_to: Optional[int] = None) -> None:
        """Restore `state` (from state()), keeping the scores of steps <= up_to."""
        self.losses = [(int(s), float(v)) for s, v in state.get("losses", []) if up_to is None or int(s) <= up_to]
        best = state.get("best_step")
        self.best_step = int(best) if best is not None else None
        self.best_loss = float(state["best_loss"]) if state.get("best_loss") is not None else None
        self.bad = int(state.get("bad", 0))


__all__ = ["ValidationTracker", "eval_mode", "validation_generator", "validation_loss", "validation_timesteps"]
