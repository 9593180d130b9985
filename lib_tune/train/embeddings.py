"""Textual-inversion vectors under training, and the seam through which prompts see them.

A TrainableEmbedding is one new word (the trigger token) with n vectors per text encoder ("clip_l" for SD1 and
SDXL's first encoder, "clip_g" for SDXL's OpenCLIP-G, "clip_h" for SD2's OpenCLIP), initialised like the webui's
Train tab: the token embeddings of an init text, spread over the n vectors (vector i = embedding of init token
i * len // n), "*" when the init text is empty.

How captions reach the vectors is a TextEmbeddingHook, made by the Trainer's `text_hook_factory`. The one hook
here is PlaceholderEmbeddingHook, the default, which serves the webui's loaded model (the webui glue passes no
factory), raw ldm/sgm models (tests) and the demo alike: `rewrite` replaces each whole-word occurrence of the
trigger by n copies of a placeholder word that the CLIP BPE vocabulary holds as one token, and a forward hook on
each encoder's token-embedding table (the table itself, inside the webui's EmbeddingsWithFixes wrapper) replaces
the rows of that token id by the vectors (k-th occurrence in a row -> vector k mod n). The placeholder is chosen
per batch among rare single-token words whose id the batch's own captions do not contain, so a caption can never
trigger it by accident.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence

import torch

from .model import DiffusionModel, TextEncoder

Tensor = torch.Tensor

#: rare words the CLIP BPE vocabulary (SD1, SD2, SDXL share it) encodes as a single token, checked at use
PLACEHOLDER_WORDS = ("rendous", "httr", "waj", "shld", "rcn", "olis", "hta", "dits", "sigue", "hertz")


class TrainableEmbedding:
    """One trigger word's vectors: {encoder key: Parameter [n_vectors, width]} (float32)."""

    def __init__(self, token: str, vectors: Dict[str, Tensor]):
        if not token or any(c in token for c in ". /\\\0\t\n"):
            raise ValueError(f"embedding token {token!r} must be one word without dots, slashes or spaces")
        self.token = token
        self.vectors: Dict[str, torch.nn.Parameter] = {
            k: torch.nn.Parameter(v.detach().clone().float()) for k, v in vectors.items()}
        if len({v.shape[0] for v in self.vectors.values()}) != 1:
            raise ValueError("every encoder needs the same number of vectors")

    @property
    def n_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    def parameters(self) -> List[torch.nn.Parameter]:
        return list(self.vectors.values())

    def file_tensors(self, bundle: bool) -> Dict[str, Tensor]:
        """Tensors as the webui and kohya store them. Standalone: `emb_params` (SD1/SD2, kohya) or
        `clip_l` + `clip_g` (SDXL). Bundled in a LoRA (pivotal): `bundle_emb.<token>.string_to_param.*` or
        `bundle_emb.<token>.clip_l` / `.clip_g`, the keys the built-in Lora's networks.py parses."""
        vecs = {k: v.detach() for k, v in self.vectors.items()}
        if "clip_g" in vecs:
            if bundle:
                return {f"bundle_emb.{self.token}.{k}": v for k, v in vecs.items()}
            return dict(vecs)
        (v,) = vecs.values()
        return {f"bundle_emb.{self.token}.string_to_param.*": v} if bundle else {"emb_params": v}


def init_embedding(model: DiffusionModel, token: str, n_vectors: int, init_text: str = "") -> TrainableEmbedding:
    """New vectors for `token` from the token embeddings of `init_text` (webui create_embedding's rule)."""
    if n_vectors < 1:
        raise ValueError("n_vectors must be >= 1")
    vectors = {}
    for enc in model.text_encoders():
        ids = enc.word_ids(init_text.strip() or "*") or enc.word_ids("*")
        table = enc.token_embedding.weight.detach()
        embedded = table[torch.tensor(ids, device=table.device)].float().cpu()
        vectors[enc.key] = torch.stack([embedded[i * len(ids) // n_vectors] for i in range(n_vectors)])
    return TrainableEmbedding(token, vectors)


class TextEmbeddingHook:
    """How captions reach trainable embeddings. install() before training, remove() after (also on errors);
    rewrite() is applied by DiffusionModel.encode_text to every batch of captions."""

    def install(self, model: DiffusionModel) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        raise NotImplementedError

    def rewrite(self, captions: List[str]) -> List[str]:
        return captions


class PlaceholderEmbeddingHook(TextEmbeddingHook):
    """Splices TrainableEmbeddings into a raw model's text encoders (see the module docstring)."""

    def __init__(self, embeddings: Sequence[TrainableEmbedding]):
        self.embeddings = list(embeddings)
        self.model: Optional[DiffusionModel] = None
        self.encoders: List[TextEncoder] = []
        self._handles = []
        self._ids: Dict[str, int] = {}  # token -> placeholder id in use for the current batch
        self._words: Dict[int, str] = {}  # placeholder id -> word
        self._patterns = {e.token: re.compile(r"(?<!\w)" + re.escape(e.token) + r"(?!\w)", re.IGNORECASE)
                          for e in self.embeddings}

    def install(self, model: DiffusionModel) -> None:
        if self.model is not None:
            raise RuntimeError("hook already installed")
        self.encoders = model.text_encoders()
        for e in self.embeddings:
            missing = [enc.key for enc in self.encoders if enc.key not in e.vectors]
            if missing:
                raise ValueError(f"embedding {e.token} has no vectors for {', '.join(missing)}")
        self._words = self._single_token_words()
        if len(self._words) < len(self.embeddings):
            raise RuntimeError("the tokenizer has too few single-token placeholder words for these embeddings")
        self.model = model
        model.text_hook = self
        for enc in self.encoders:
            self._handles.append(enc.token_embedding.register_forward_hook(self._make_hook(enc.key)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.model is not None and self.model.text_hook is self:
            self.model.text_hook = None
        self.model = None

    def _single_token_words(self) -> Dict[int, str]:
        out: Dict[int, str] = {}
        for word in PLACEHOLDER_WORDS:
            ids = {tuple(enc.word_ids(word)) for enc in self.encoders}
            if len(ids) == 1:
                (one,) = ids
                if len(one) == 1:
                    out[one[0]] = word
        return out

    def rewrite(self, captions: List[str]) -> List[str]:
        used = set()
        for enc in self.encoders:
            used.update(enc.tokenize(captions).flatten().tolist())
        free = [i for i in self._words if i not in used]
        if len(free) < len(self.embeddings):
            raise RuntimeError("every placeholder word occurs in these captions; cannot splice embeddings")
        self._ids = {}
        out = list(captions)
        for e, pid in zip(self.embeddings, free):
            self._ids[e.token] = pid
            repl = " ".join([self._words[pid]] * e.n_vectors)
            out = [self._patterns[e.token].sub(repl, c) for c in out]
        return out

    def _make_hook(self, key: str):
        def hook(module, inputs, output):
            ids = inputs[0]
            for e in self.embeddings:
                pid = self._ids.get(e.token)
                if pid is None:
                    continue
                mask = ids == pid
                if not bool(mask.any()):
                    continue
                vec = e.vectors[key].to(device=output.device, dtype=output.dtype)
                k = (mask.long().cumsum(dim=1) - 1).clamp(min=0) % e.n_vectors
                output = torch.where(mask.unsqueeze(-1), vec[k], output)
            return output
        return hook
