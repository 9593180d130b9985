"""A small interface over the model the webui has loaded (or a raw ldm / sgm model): what training needs, nothing
more, and a way to make it trainable and give it back exactly as it was.

Why one class for ldm (SD1/SD2) and sgm (SDXL): the trainer, the objective and the samplers only need
"latents from pixels", "conditioning from captions", "the model's prediction" and the noise schedule; the
families differ in how each is obtained:

- text: ldm models have `get_learned_conditioning`, which in the webui goes through its hijack (prompt
  emphasis, TI embeddings) and on a raw model through the ldm encoder; SDXL's conditioner is called with a
  batch dict holding the captions and the size/crop conditioning (original_size_as_tuple, crop_coords_top_left,
  target_size_as_tuple) per sample, which works raw and hijacked alike (the webui wraps the embedders in place);
- prediction: `apply_model` (ldm; the webui adds one to sgm models) or sgm's `model` wrapper, whose DDPM
  formulation (x_t = sqrt(a) x0 + sqrt(1-a) eps, integer timestep) is the one kohya trains SDXL with;
- the noise schedule: `alphas_cumprod` (ldm; the webui keeps a float copy in `alphas_cumprod_original` when it
  downcasts) or sgm's discrete denoiser sigmas (a = 1 / (1 + sigma^2)).

`session()` freezes every base parameter and records/restores requires_grad flags, train/eval modes and the
attributes it changes (ldm/sgm `use_checkpoint`/`checkpoint` flags, sgm embedders' `is_trainable`/`ucg_rate`),
in a finally block. ldm's and sgm's own gradient checkpointing pass only the block's own parameters to their
custom autograd function, so gradients of adapter tensors living outside the block would be dropped: their flags
are switched off for training, and the `gradient_checkpointing` option wraps the blocks with
torch.utils.checkpoint (non-reentrant) instead, as the webui's sd_hijack_checkpoint does.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ..inject.targets import Targets, find_targets

Tensor = torch.Tensor
#: ldm: a [B, T, C] tensor; SDXL: {"crossattn": [B, T, C], "vector": [B, D]}
Cond = Union[Tensor, Dict[str, Tensor]]
#: SDXL size conditioning of one sample: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)
SizeCond = Tuple[int, int, int, int, int, int]

#: module classes whose forward is wrapped by torch.utils.checkpoint when gradient checkpointing is on
CHECKPOINT_BLOCKS = ("ResBlock", "BasicTransformerBlock", "AttentionBlock")


@dataclass
class TextEncoder:
    """One text encoder as training sees it: the key its TI vectors are saved under ("clip_l", "clip_g",
    "clip_h"), the (unwrapped) encoder module, its token-embedding table, and a tokenizer giving [B, 77] ids."""
    key: str
    module: torch.nn.Module
    token_embedding: torch.nn.Embedding
    tokenize: Callable[[Sequence[str]], Tensor]
    bos: int = 49406
    eos: int = 49407

    @property
    def width(self) -> int:
        return self.token_embedding.weight.shape[1]

    def word_ids(self, text: str) -> List[int]:
        """Token ids of `text` without start/end/padding tokens (open_clip pads with 0, a real token)."""
        ids = self.tokenize([text])[0].tolist()
        if ids and ids[0] == self.bos:
            ids = ids[1:]
        return ids[:ids.index(self.eos)] if self.eos in ids else ids


def _unwrap(m):
    return getattr(m, "wrapped", m)


def _describe_encoder(key: str, enc: torch.nn.Module) -> Optional[TextEncoder]:
    enc = _unwrap(enc)
    transformer = getattr(enc, "transformer", None)
    tokenizer = getattr(enc, "tokenizer", None)
    if transformer is not None and tokenizer is not None and hasattr(transformer, "text_model"):
        max_length = getattr(enc, "max_length", 77)

        def hf_tokenize(texts, _tok=tokenizer, _n=max_length):
            return _tok(list(texts), truncation=True, max_length=_n, padding="max_length",
                        return_tensors="pt")["input_ids"]

        # the webui wraps the table in EmbeddingsWithFixes (.wrapped): the table itself is what training reads
        return TextEncoder(key, enc, _unwrap(transformer.text_model.embeddings.token_embedding), hf_tokenize,
                           bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id)
    model = getattr(enc, "model", None)
    if model is not None and isinstance(_unwrap(getattr(model, "token_embedding", None)), torch.nn.Embedding):
        def oc_tokenize(texts):
            import open_clip

            return open_clip.tokenize(list(texts))

        return TextEncoder(key, enc, _unwrap(model.token_embedding), oc_tokenize)
    return None


class DiffusionModel:
    """The loaded SD1/SD2/SDXL model, seen through what training needs. Never copies weights."""

    def __init__(self, sd_model, device: Optional[torch.device] = None):
        self.sd_model = sd_model
        self.is_sdxl = hasattr(sd_model, "conditioner")
        self.targets: Targets = find_targets(sd_model)
        self.architecture = self.targets.architecture
        self.prediction_type = prediction_type_of(sd_model)
        self.alphas_cumprod = alphas_cumprod_of(sd_model)
        self.scale_factor = float(getattr(sd_model, "scale_factor", 1.0))
        self.device = device if device is not None else next(self.unet.parameters()).device
        #: splices TI vectors into prompts (PlaceholderEmbeddingHook raw, the webui's embedding db in the webui)
        self.text_hook = None

    # ---- parts ---------------------------------------------------------------------------------------------
    @property
    def unet(self) -> torch.nn.Module:
        return self.sd_model.model.diffusion_model

    @property
    def native_resolution(self) -> int:
        """The side the model was trained at: 1024 SDXL, 768 SD2-v, else 512."""
        if self.is_sdxl:
            return 1024
        return 768 if self.architecture == "sd2" and self.prediction_type == "v" else 512

    @property
    def num_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def text_is_deterministic(self) -> bool:
        """Whether a caption always gives the same conditioning (False when sgm's conditioner drops it at random:
        embedders with ucg_rate > 0)."""
        if not self.is_sdxl:
            return True
        return all(not float(getattr(e, "ucg_rate", 0.0) or 0.0) for e in self.sd_model.conditioner.embedders)

    def text_encoder_modules(self) -> List[torch.nn.Module]:
        """The text-encoder modules as the model holds them (wrapped in the webui)."""
        if self.is_sdxl:
            return [e for e in self.sd_model.conditioner.embedders
                    if hasattr(e, "wrapped") or next(e.parameters(), None) is not None]
        return [self.sd_model.cond_stage_model]

    def text_encoders(self) -> List[TextEncoder]:
        """Encoders with a token table (for TI): SD1 clip_l, SD2 clip_h, SDXL clip_l + clip_g."""
        if self.is_sdxl:
            keys = ["clip_l", "clip_g"]
        else:
            keys = ["clip_h" if self.architecture == "sd2" else "clip_l"]
        out = []
        for key, enc in zip(keys, self.text_encoder_modules()):
            info = _describe_encoder(key, enc)
            if info is None:
                raise TypeError(f"text encoder {type(_unwrap(enc)).__name__} has no token embedding this trainer "
                                f"knows (expected a Hugging Face CLIP or an OpenCLIP text model)")
            out.append(info)
        return out

    # ---- data -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        """[B, 3, H, W] in [-1, 1] -> scaled latents [B, 4, H/8, W/8] (float32). Uses the mean of the VAE's
        posterior (no sampling): cacheable and the same on every run."""
        fsm = self.sd_model.first_stage_model
        p = next(fsm.parameters())
        x = pixels.to(device=p.device, dtype=p.dtype)
        with _no_autocast(x.device):
            if hasattr(fsm, "encoder") and hasattr(fsm, "quant_conv"):
                mean = fsm.quant_conv(fsm.encoder(x)).chunk(2, dim=1)[0]
            else:
                out = fsm.encode(x)
                mean = out.mode() if hasattr(out, "mode") else out
        return (mean.float() * self.scale_factor).to(self.device)

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents -> [B, 3, H, W] in [-1, 1] (float32)."""
        fsm = self.sd_model.first_stage_model
        p = next(fsm.parameters())
        with _no_autocast(p.device):
            x = fsm.decode((latents / self.scale_factor).to(device=p.device, dtype=p.dtype))
        return x.float().clamp(-1, 1)

    def encode_text(self, captions: Sequence[str], size_cond: Optional[Sequence[SizeCond]] = None,
                    image_size: Tuple[int, int] = (1024, 1024)) -> Cond:
        """Conditioning for captions. SDXL: size_cond per sample, else (h, w) = image_size uncropped.
        Gradients flow when grad is enabled (TE adapters, TI vectors)."""
        captions = [str(c) for c in captions]
        if self.text_hook is not None:
            captions = self.text_hook.rewrite(captions)
        with self._encoder_devices():
            if not self.is_sdxl:
                return self.sd_model.get_learned_conditioning(captions)
            if size_cond is None:
                h, w = image_size
                size_cond = [(h, w, 0, 0, h, w)] * len(captions)
            sc = torch.tensor([list(s) for s in size_cond], dtype=torch.float32, device=self.device)
            batch = {"txt": captions, "original_size_as_tuple": sc[:, 0:2], "crop_coords_top_left": sc[:, 2:4],
                     "target_size_as_tuple": sc[:, 4:6]}
            out = self.sd_model.conditioner(batch)
            return {"crossattn": out["crossattn"], "vector": out["vector"]}

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """The UNet's output (eps or v, see prediction_type) for noisy latents at integer timesteps t."""
        if hasattr(self.sd_model, "apply_model"):
            return self.sd_model.apply_model(x_t, t, cond)
        return self.sd_model.model(x_t, t, cond)

    @contextlib.contextmanager
    def _encoder_devices(self):
        """Raw ldm/sgm encoders move token ids to `self.device`, which is "cuda" unless set: point it at the
        encoder's real device for the call (the webui's hijack does not use it)."""
        saved = []
        for enc in self.text_encoder_modules():
            inner = _unwrap(enc)
            dev = getattr(inner, "device", None)
            p = next(inner.parameters(), None)
            if isinstance(dev, (str, torch.device)) and p is not None and torch.device(dev) != p.device:
                saved.append((inner, dev))
                inner.device = p.device
        try:
            yield
        finally:
            for inner, dev in saved:
                inner.device = dev

    # ---- trainability -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self, train_unet: bool = True, train_text: bool = False,
                gradient_checkpointing: bool = False) -> Iterator["DiffusionModel"]:
        """Freeze the base model for adapter training and restore everything on exit, exception or not.

        train_unet / train_text: which parts run in train mode and (SDXL) which embedders let gradients
        through the conditioner (text-encoder adapters and TI vectors need them)."""
        undo = _Undo()
        try:
            params = _unique_params(self.sd_model)
            for p in params:
                undo.attr(p, "requires_grad", p.requires_grad)
                p.requires_grad_(False)
            for m in self.sd_model.modules():  # per module, not m.train(): that would recurse into children
                undo.attr(m, "training", m.training)
            for m in self.unet.modules():
                for flag in ("use_checkpoint", "checkpoint"):
                    if isinstance(getattr(m, flag, None), bool):
                        undo.attr(m, flag, getattr(m, flag))
                        setattr(m, flag, False)
            if self.is_sdxl and train_text:
                for e in self.text_encoder_modules():
                    for attr, value in (("is_trainable", True), ("ucg_rate", 0.0)):
                        if hasattr(e, attr):
                            undo.attr(e, attr, getattr(e, attr))
                            setattr(e, attr, value)
            # flags set directly: ldm replaces a frozen cond stage's train() by a function that ignores it
            if train_unet:
                set_training(self.unet, True)
            if train_text:
                for e in self.text_encoder_modules():
                    set_training(e, True)
            if gradient_checkpointing:
                for m in self.unet.modules():
                    if type(m).__name__ in CHECKPOINT_BLOCKS:
                        _wrap_checkpoint(m, undo)
            yield self
        finally:
            undo.run()


class _Undo:
    """A stack of restore actions, run in reverse order; a failing action does not stop the others."""

    def __init__(self):
        self.actions: List[Callable[[], None]] = []

    def attr(self, obj, name: str, value) -> None:
        if name == "requires_grad":
            self.actions.append(lambda: obj.requires_grad_(value))
        else:
            self.actions.append(lambda: setattr(obj, name, value))

    def run(self) -> None:
        errors = []
        while self.actions:
            try:
                self.actions.pop()()
            except Exception as e:  # noqa: BLE001 - restore as much as possible, then report
                errors.append(e)
        if errors:
            raise errors[0]


def set_training(module: torch.nn.Module, mode: bool) -> None:
    """Set train/eval mode on every submodule directly (module.train() may be disabled, see session)."""
    for m in module.modules():
        m.training = mode


def _unique_params(module: torch.nn.Module) -> List[torch.nn.Parameter]:
    seen, out = set(), []
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _wrap_checkpoint(module: torch.nn.Module, undo: _Undo) -> None:
    """Instance-level forward that recomputes the block in backward (torch.utils.checkpoint, non-reentrant:
    gradients reach every tensor used inside, adapter tensors included)."""
    from torch.utils.checkpoint import checkpoint

    prev = module.__dict__.get("forward")
    inner = prev if prev is not None else (lambda *a, **k: type(module).forward(module, *a, **k))

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    module.forward = forward

    def restore():
        if module.__dict__.get("forward") is forward:
            if prev is None:
                del module.forward
            else:
                module.forward = prev

    undo.actions.append(restore)


@contextlib.contextmanager
def _no_autocast(device: torch.device):
    if device.type == "cuda":
        with torch.autocast("cuda", enabled=False):
            yield
    else:
        yield


def prediction_type_of(sd_model) -> str:
    """'eps' or 'v': ldm's `parameterization` (the webui sets it on SDXL too), else sgm's denoiser scaling."""
    p = getattr(sd_model, "parameterization", None)
    if p in ("eps", "v"):
        return p
    if p is not None:
        raise ValueError(f"unsupported parameterization {p!r} (only eps and v can be trained)")
    scaling = getattr(getattr(sd_model, "denoiser", None), "scaling", None)
    return "v" if scaling is not None and type(scaling).__name__.startswith("V") else "eps"


def alphas_cumprod_of(sd_model) -> Tensor:
    """The DDPM cumulative alphas [1000], float32 on the CPU."""
    for name in ("alphas_cumprod_original", "alphas_cumprod"):
        a = getattr(sd_model, name, None)
        if isinstance(a, torch.Tensor) and a.numel() > 1:
            return a.detach().to("cpu", torch.float64).float()
    sigmas = getattr(getattr(sd_model, "denoiser", None), "sigmas", None)
    if isinstance(sigmas, torch.Tensor):
        s = sigmas.detach().to("cpu", torch.float64)
        return (1.0 / (1.0 + s ** 2)).float()
    raise ValueError("the model has neither alphas_cumprod nor a discrete denoiser: cannot train it")


# ---- conditioning helpers ---------------------------------------------------------------------------------
def cond_cat(conds: Sequence[Cond]) -> Cond:
    """Concatenate conditionings along the batch (ldm tensors of different lengths are padded by repeating
    their last token, as the webui does for CFG batches)."""
    if isinstance(conds[0], dict):
        return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
    n = max(c.shape[1] for c in conds)
    padded = [c if c.shape[1] == n else torch.cat([c, c[:, -1:].expand(-1, n - c.shape[1], -1)], 1) for c in conds]
    return torch.cat(padded)
