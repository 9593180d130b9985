"""The training loop: one Trainer per job, driven by the webui glue (or a test, or the demo) through callbacks.

What a step does: for each of `gradient_accumulation` micro-batches (batch i = step * accumulation + micro), draw
noise and timesteps from a generator seeded by (seed, i), encode the captions (through the text encoder's
adapters / TI vectors when those train), predict with the adapter applied by the injection engine in train mode
(the same engine that serves prompt tags; deltas rebuilt with autograd each forward), and backpropagate the
objective; then clip, step the optimizer and the LR schedule. A step is a pure function of the state before it,
which is what makes resume exact.

Callbacks (any object; missing methods are skipped): on_step(step, total, loss, lr) after each optimizer step;
should_stop() before each step (Interrupt: the run ends after saving, unless save_on_stop is off);
on_sample(step) every `sample_every` steps, with the adapter applied for inference (injector in merge mode,
model in eval mode, no grad) so the glue can render previews with the webui's sampler; on_save(path) after each
adapter file is written; on_validation(step, loss, is_best) after each validation score.

Validation (config validation_count / validation_split; validation.py): every `validation_interval` steps and at
the end of a run that was not interrupted, the held-out images are scored inside the step context (adapter
applied, model in eval mode, no grad, fixed noise and timesteps). A new best writes `<output_name>-best
.safetensors` (keep_best); after `early_stopping_patience` scores without improvement the run ends as a normal
finish (final file saved, TrainResult.early_stopped).

Staged plans (config `stages`; stages.py): on_stage(index, stage) when the run enters a stage (also at the start
of a run resumed inside one; `stage.start` is its first step), `trainer.stage` the current Stage. Only the
current stage's modules train (a fresh optimizer and schedule per stage), earlier stages' stay applied frozen,
later stages' are not applied; the state records the live stage, so resume is exact within and across stages.

Whatever happens (exception, stop, normal end) the injector is cleared, the TI hook removed and the model's
requires_grad flags, train/eval modes and changed attributes restored (DiffusionModel.session).
"""
from __future__ import annotations

import contextlib
import os
import hashlib
import re
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch

from ..inject.engine import Injector
from .config import RESUMABLE_CHANGES, ConfigError, TrainConfig
from .data import TrainingData
from .embeddings import PlaceholderEmbeddingHook, TextEmbeddingHook, TrainableEmbedding, init_embedding
from .file_metadata import file_metadata
from .metadata import add_hashes
from .methods import CONV_METHODS, MethodSpec, TrainableAdapter, create_adapter
from .model import DiffusionModel, set_training
from .objective import ObjectiveConfig, diffusion_loss
from .optim import build_optimizer, build_scheduler
from .stages import Stage, build_plan, resolve_plan, stage_at, stage_warmup, unused_last_layers
from .text_cache import TextCache
from .state import Checkpoints, capture_rng, cast_for_saving, load_state, restore_rng, write_adapter_file
from .validation import ValidationTracker, eval_mode, validation_loss

class TrainerCallbacks:
    """No-op callbacks to subclass (the Trainer also accepts any object with some of these methods)."""

    def on_step(self, step: int, total: int, loss: float, lr: float) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def on_sample(self, step: int) -> None:
        pass

    def on_save(self, path: str) -> None:
        pass

    def on_validation(self, step: int, loss: float, is_best: bool) -> None:
        pass


@dataclass
class TrainResult:
    adapter_path: Optional[str]
    steps_done: int
    total_steps: int
    stopped: bool
    losses: List[float] = field(default_factory=list)
    saved: List[str] = field(default_factory=list)
    state_path: Optional[str] = None
    #: (step, validation loss) of every held-out score; the best one; whether patience ended the run
    val_losses: List[Tuple[int, float]] = field(default_factory=list)
    best_step: Optional[int] = None
    best_val_loss: Optional[float] = None
    best_path: Optional[str] = None
    early_stopped: bool = False


def step_generator(seed: int, index: int) -> torch.Generator:
    """The generator of micro-batch `index`: independent streams per index, the same in every process."""
    digest = hashlib.sha256(f"{seed}:noise:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))


def strip_trigger(caption: str, trigger: str) -> str:
    """The caption without the trigger word (the class prompt of the base-prediction prior)."""
    out = re.sub(r"(?<!\w)" + re.escape(trigger.strip()) + r"(?!\w)", "", caption, flags=re.IGNORECASE)
    return re.sub(r"\s*,\s*(,\s*)+", ", ", out).strip(" ,")


class Trainer:
    """config: a validated TrainConfig; model: DiffusionModel of the loaded model; data: TrainingData built for
    this config (data.prepare_data). injector: the engine to apply the adapter with (default: a new one; the
    webui glue passes its own). text_hook_factory: embeddings -> TextEmbeddingHook (default:
    PlaceholderEmbeddingHook for raw models; the glue passes one backed by the webui's embedding db)."""

    def __init__(self, config: TrainConfig, model: DiffusionModel, data: TrainingData, callbacks=None,
                 injector: Optional[Injector] = None,
                 text_hook_factory: Optional[Callable[[List[TrainableEmbedding]], TextEmbeddingHook]] = None,
                 run_info: Optional[dict] = None):
        config.validate()
        self.config = config
        self.model = model
        self.data = data
        self.callbacks = callbacks if callbacks is not None else TrainerCallbacks()
        self.injector = injector if injector is not None else Injector()
        self.text_hook_factory = text_hook_factory or PlaceholderEmbeddingHook
        #: extra RunInfo fields from the glue (sd_model_name, hashes, clip_skip, ...)
        self.run_info = dict(run_info or {})
        self.total = config.steps
        self.step = 0
        self.losses: List[float] = []
        self.saved: List[str] = []
        self.session_id = int.from_bytes(hashlib.sha256(f"{time.time_ns()}".encode()).digest()[:4], "little")
        self.started_at = time.time()

        embedding = None
        if config.trains_embedding:
            embedding = init_embedding(model, config.trigger, config.num_vectors, config.init_text)
        spec = MethodSpec(method=config.method, dim=config.network_dim, alpha=config.network_alpha,
                          conv_dim=config.conv_dim, conv_alpha=config.conv_alpha, preset=config.targets,
                          train_text_encoder=config.train_text_encoder, lokr_factor=config.lokr_factor,
                          seed=config.seed)
        #: the staged plan (empty without `stages`) and the stage whose optimizer is live (stage_index)
        self.plan: List[Stage] = build_plan(config)
        self.stage_index = 0
        selected = resolve_plan(model.targets, self.plan, spec.method in CONV_METHODS,
                                unused_last_layers(model)) if self.plan else None
        self.adapter: TrainableAdapter = create_adapter(model.targets, spec, embedding, device=model.device,
                                                        selected=selected)
        if self.plan:
            self._build_stage_optimizer(0)
        else:
            lrs = {"unet": config.unet_lr, "te": config.te_lr, "emb": config.emb_lr}
            self.optimizer = build_optimizer(config.optimizer, self.adapter.param_groups(), lrs,
                                             config.weight_decay)
            self.scheduler = build_scheduler(self.optimizer, config.lr_scheduler, self.total, config.warmup,
                                             config.lr_cycles)
        self.precision = self._precision()
        self.scaler = torch.cuda.amp.GradScaler() if self.precision == torch.float16 else None
        self.objective = ObjectiveConfig(min_snr_gamma=config.min_snr_gamma, noise_offset=config.noise_offset,
                                         prior_loss_weight=config.prior_loss_weight, t_max=model.num_timesteps)
        self.checkpoints = Checkpoints(config.output_dir, config.output_name, config.state_dir,
                                       config.keep_last) if config.output_dir else None
        self.hook: Optional[TextEmbeddingHook] = None
        aug = getattr(data, "caption_aug", None)
        self.text = TextCache(lambda c, s: self.model.encode_text(c, s), enabled=bool(
            config.cache_text_outputs and not config.train_text_encoder and not self.trains_text
            and not (aug is not None and aug.active)
            and model.text_is_deterministic))
        self.val_every = config.validation_interval
        if self.val_every and not getattr(data, "val_items", None):
            raise ConfigError("validation_split" if not config.validation_count else "validation_count",
                              "the training data holds no images out (build it with data.prepare_data)")
        self.validation = ValidationTracker(patience=config.early_stopping_patience,
                                            min_delta=config.early_stopping_min_delta)
        self.val_batches = None
        self.best_path: Optional[str] = None
        self.early_stopped = False

    # ---- public ----------------------------------------------------------------------------------------------
    @property
    def trains_text(self) -> bool:
        return bool(self.adapter.te_keys) or bool(self.adapter.embeddings)

    def resume(self, path: str) -> int:
        """Load a saved state (a state folder); the next run() continues after its step. Returns that step."""
        payload = load_state(path)
        saved = payload.get("config", {})
        now = self.config.to_dict()
        for key, value in now.items():
            if key not in RESUMABLE_CHANGES and key in saved and saved[key] != value:
                raise ConfigError(key, f"differs from the run being resumed ({saved[key]!r} there, {value!r} "
                                       f"here)")
        self.adapter.load_tensors(payload["adapter"])
        if self.plan:  # the saved optimizer/schedule are those of the stage that was live at the save
            self._build_stage_optimizer(int(payload.get("stage", 0)))
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        if self.scaler is not None and payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        self.step = int(payload["step"])
        self.losses = [float(x) for x in payload.get("losses", [])][: self.step]
        self.validation.load(payload.get("validation", {}), up_to=self.step)
        self.best_path = payload.get("best_path") or None
        self.early_stopped = self.validation.should_stop  # the state of an early-stopped run: it stays finished
        run = payload.get("run", {})
        self.session_id = int(run.get("session_id", self.session_id))
        self.started_at = float(run.get("training_started_at", self.started_at))
        restore_rng(payload.get("rng", {}))
        return self.step

    def run(self) -> TrainResult:
        cfg = self.config
        stopped = False
        state_path = None
        self._entered: Optional[int] = None  # the stage entered in this run (staged plans)
        with self.model.session(train_unet=bool(self.adapter.has_network), train_text=self.trains_text,
                                gradient_checkpointing=cfg.gradient_checkpointing):
            try:
                if self.adapter.embeddings:
                    self.hook = self.text_hook_factory(self.adapter.embeddings)
                    self.hook.install(self.model)
                self.injector.apply(self._entries(), train=True)
                while self.step < self.total and not self.early_stopped:
                    if self._call("should_stop"):
                        stopped = True
                        break
                    with self._step_context():
                        if self.plan and self._entered != stage_at(self.plan, self.step):
                            self._entered = self._enter_stage(stage_at(self.plan, self.step))
                        lr = self._lr()
                        loss = self._train_step(self.step)
                        self.step += 1
                        self.losses.append(loss)
                        self._call("on_step", self.step, self.total, loss, lr)
                        if cfg.sample_every and self.step % cfg.sample_every == 0:
                            self._sample(self.step)
                        if self.val_every and self.step % self.val_every == 0:
                            self._validate()
                        if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total:
                            self._save(final=False)
                if self.val_every and not stopped and self.step > 0 and self.validation.last_step != self.step:
                    with self._step_context():
                        self._validate()
                final = None
                if self.step > 0 and (not stopped or cfg.save_on_stop):
                    final, state_path = self._save(final=True)
            finally:
                self.injector.clear()
                if self.hook is not None:
                    self.hook.remove()
                    self.hook = None
                if self.plan:
                    for p in self.adapter.parameters():
                        p.requires_grad_(True)
        v = self.validation
        return TrainResult(adapter_path=final, steps_done=self.step, total_steps=self.total, stopped=stopped,
                           losses=list(self.losses), saved=list(self.saved), state_path=state_path,
                           val_losses=list(v.losses), best_step=v.best_step, best_val_loss=v.best_loss,
                           best_path=self.best_path, early_stopped=self.early_stopped)

    # ---- one step --------------------------------------------------------------------------------------------------
    def _train_step(self, step: int) -> float:
        cfg = self.config
        accum = cfg.gradient_accumulation
        params = self.adapter.parameters()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(accum):
            index = step * accum + micro
            batch = self.data.batch(index)
            g = step_generator(cfg.seed, index)
            with self._autocast():
                with (contextlib.nullcontext() if self.trains_text else torch.no_grad()):
                    cond = self.text(batch.captions, batch.size_cond)
                weights = None
                if cfg.prior == "class_images" and bool(batch.is_reg.any()):
                    weights = torch.where(batch.is_reg, cfg.prior_loss_weight, 1.0)
                prior_fn = None
                if cfg.prior == "base_prediction":
                    prompts = [cfg.class_prompt or strip_trigger(c, cfg.trigger) for c in batch.captions]

                    def prior_fn(prompts=prompts, size_cond=batch.size_cond):
                        return self.text(prompts, size_cond)
                parts = diffusion_loss(self.model.predict, batch.latents, cond, self.model.alphas_cumprod,
                                       self.model.prediction_type, g, self.objective, sample_weights=weights,
                                       prior_cond_fn=prior_fn, adapter_off=self._adapter_off)
            loss = parts.loss / accum
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            total += float(parts.loss.detach()) / accum
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        return total

    @contextlib.contextmanager
    def _adapter_off(self):
        """The base model alone: no adapter on any layer (the TI hook stays; prior prompts lack the trigger)."""
        self.injector.clear()
        try:
            yield
        finally:
            self.injector.apply(self._entries(), train=True)

    # ---- staged plans ------------------------------------------------------------------------------------------
    @property
    def stage(self) -> Optional[Stage]:
        """The current stage of a staged plan (None without one)."""
        return self.plan[self.stage_index] if self.plan else None

    def _live_keys(self) -> Optional[set]:
        """The modules applied now: those of the stages up to the current one (None: all, no plan)."""
        if not self.plan:
            return None
        return {k for s in self.plan[: self.stage_index + 1] for k in s.keys}

    def _entries(self):
        live = self._live_keys()
        entries = self.adapter.entries()
        return entries if live is None else [a for a in entries if a.entry.key in live]

    def _build_stage_optimizer(self, index: int) -> None:
        """Make stage `index` current: only its modules (and TI vectors) require grad and sit in a fresh
        optimizer with its LRs and a schedule over its steps."""
        cfg, st = self.config, self.plan[index]
        self.stage_index = index
        for p in self.adapter.parameters():  # no stale gradient of the previous stage reaches the clipping
            p.requires_grad_(False)
            p.grad = None
        groups = self.adapter.param_groups(set(st.keys))
        for ps in groups.values():
            for p in ps:
                p.requires_grad_(True)
        lrs = {"unet": st.unet_lr, "te": st.te_lr, "emb": cfg.emb_lr}
        self.optimizer = build_optimizer(cfg.optimizer, groups, lrs, cfg.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, cfg.lr_scheduler, st.steps, stage_warmup(cfg, st),
                                         cfg.lr_cycles)

    def _enter_stage(self, index: int) -> int:
        """At a stage's first step (or the first step of a run): a fresh optimizer when the stage changes, the
        stage's modules applied, and on_stage."""
        if index != self.stage_index:
            self._build_stage_optimizer(index)
        self.injector.apply(self._entries(), train=True)
        self._call("on_stage", index, self.plan[index])
        return index

    def _precision(self) -> Optional[torch.dtype]:
        mp = self.config.mixed_precision
        if self.model.device.type != "cuda" or mp == "no":
            return None
        if mp == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if mp == "bf16" else torch.float16

    def _autocast(self):
        if self.precision is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.precision)

    def _lr(self) -> float:
        """The LR of this step's first group (unet, else te, else emb)."""
        return float(self.optimizer.param_groups[0]["lr"])

    @contextlib.contextmanager
    def _step_context(self):
        """Around each step. With a callbacks.step_context() (the webui glue: its queue lock), the adapter is
        applied only inside it, so whatever runs between two steps (a txt2img) sees the model as it is."""
        outer = getattr(self.callbacks, "step_context", None)
        if not callable(outer):
            yield
            return
        with outer():
            self.injector.apply(self._entries(), train=True)
            try:
                yield
            finally:
                self.injector.clear()

    def _call(self, name: str, *args):
        fn = getattr(self.callbacks, name, None)
        return fn(*args) if callable(fn) else None

    # ---- previews ---------------------------------------------------------------------------------------------
    def _sample(self, step: int) -> None:
        modes = [(m, m.training) for m in self.model.sd_model.modules()]
        self.injector.apply(self._entries(), train=False)
        try:
            set_training(self.model.sd_model, False)
            with torch.no_grad():
                self._call("on_sample", step)
        finally:
            for m, mode in modes:
                m.training = mode
            self.injector.apply(self._entries(), train=True)

    # ---- validation -----------------------------------------------------------------------------------------
    def _validate(self) -> float:
        """Score the held-out set now (inside the step context: the adapter is applied in train mode; autograd
        off and the model in eval mode make that the plain forward), record it, keep the best, decide."""
        cfg = self.config
        if self.val_batches is None:
            self.val_batches = self.data.validation_set()
        with eval_mode(self.model.sd_model), torch.no_grad(), self._autocast():
            loss = validation_loss(self.model, self.val_batches, cfg.seed, cfg.validation_timesteps)
        is_best = self.validation.record(self.step, loss)
        if is_best and cfg.keep_best:
            self._save_best()
        self._call("on_validation", self.step, loss, is_best)
        self.early_stopped = self.validation.should_stop
        return loss

    def _save_best(self) -> Optional[str]:
        """`<output_name>-best.safetensors` next to the final file, with its own ss_output_name and the best
        step and loss in ss_tune_best_step / ss_tune_best_val_loss (the sshs hashes cover them)."""
        if self.checkpoints is None:
            return None
        cfg = self.config
        tensors = cast_for_saving(self.adapter.tensors(), cfg.save_dtype)
        name = f"{cfg.output_name}-best"
        path = os.path.join(cfg.output_dir, name + ".safetensors")
        metadata = dict(self._metadata(tensors, name), ss_tune_best_step=str(self.validation.best_step),
                        ss_tune_best_val_loss=repr(float(self.validation.best_loss)))
        if "sshs_model_hash" in metadata:
            metadata = add_hashes(tensors, metadata)
        write_adapter_file(path, tensors, metadata)
        self.best_path = path
        if path not in self.saved:
            self.saved.append(path)
        self._call("on_save", path)
        return path

    # ---- saving -------------------------------------------------------------------------------------------------
    def _save(self, final: bool):
        if self.checkpoints is None:
            return None, None
        cfg = self.config
        tensors = cast_for_saving(self.adapter.tensors(), cfg.save_dtype)
        path = self.checkpoints.adapter_path(None if final else self.step)
        # an intermediate file is named by its own stem: sharing the final file's ss_output_name would make it an
        # alias the built-in Lora resolves `<lora:output_name>` to (the last file listed wins)
        name = os.path.splitext(os.path.basename(path))[0]
        write_adapter_file(path, tensors, self._metadata(tensors, name))
        self.saved.append(path)
        self._call("on_save", path)
        state_path = None
        if cfg.save_state:
            state_path = self.checkpoints.write_state(self.step, self.state_payload())
        self.checkpoints.prune()
        return path, state_path

    def state_payload(self) -> dict:
        return {
            "step": self.step,
            "stage": self.stage_index,
            "data_index": self.step * self.config.gradient_accumulation,
            "config": self.config.to_dict(),
            "adapter": {k: v.detach().to("cpu", torch.float32).clone() if v.is_floating_point() else v.cpu()
                        for k, v in self.adapter.tensors().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": capture_rng(),
            "losses": list(self.losses),
            "validation": self.validation.state(),
            "best_path": self.best_path,
            "run": {"session_id": self.session_id, "training_started_at": self.started_at},
        }

    def _metadata(self, tensors, output_name: Optional[str] = None) -> dict:
        extra = dict(self.run_info)
        if output_name and output_name != self.config.output_name:
            extra["output_name"] = output_name
        return file_metadata(self.config, self.model, self.data, tensors, step=self.step, total=self.total,
                             session_id=self.session_id, started_at=self.started_at, precision=self.precision,
                             extra=extra)
