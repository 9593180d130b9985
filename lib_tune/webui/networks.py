"""The `tune` extra network: the webui calls activate() with the parsed `<tune:...>` tags of each batch and
deactivate() after the generation; the work is lib_tune.runtime's.

Also: per-step weights (on_cfg_denoiser), bundled textual-inversion embeddings (registered in the webui's
embedding database for the generation), infotext (`Tune`, `Tune hashes`) and its paste-back, and optionally
serving `<lora:...>`/`<lyco:...>` instead of the built-in Lora.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional

from modules import extra_networks, script_callbacks, shared

from ..library import Library
from ..prompt import infotext as tune_infotext
from ..prompt.errors import TagError
from ..prompt.tags import parse_params
from ..runtime import Runtime

log = logging.getLogger("sd-webui-tune")

_runtime: Optional[Runtime] = None


def lora_dirs() -> List[str]:
    dirs = [getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(shared.models_path, "Lora")]
    lyco = getattr(shared.cmd_opts, "lyco_dir_backcompat", None)
    if lyco and lyco not in dirs:
        dirs.append(lyco)
    return dirs


def runtime() -> Runtime:
    global _runtime
    if _runtime is None:
        lib = Library(lora_dirs())
        lib.refresh()
        _runtime = Runtime(lib, cache_size=int(getattr(shared.opts, "tune_cache_adapters", 4) or 4),
                           loader=load_like_builtin)
        _runtime.injector.before_call = builtin_sync()
    return _runtime


def builtin_sync():
    """The built-in Lora merges its adapters into the weights lazily, in its patched forward of each layer. Before
    we swap our merged weights into a layer, let it bring the real weights up to date (merge or restore), so it
    never writes into our tensors and both engines stack correctly."""
    import sys
    builtin = sys.modules.get("networks")
    apply = getattr(builtin, "network_apply_weights", None)
    if apply is None or not hasattr(builtin, "loaded_networks"):
        return None
    return apply


def load_like_builtin(path: str):
    """Read an adapter file and hold its tensors in the dtypes the built-in Lora uses (LoRA factors in the
    webui's compute dtype), so that our images equal the built-in's."""
    from modules import devices
    from ..formats.read import load_adapter
    adapter = load_adapter(path)
    for m in adapter.modules.values():
        m.cast_like_builtin(devices.dtype)
    return adapter


def warn(message: str) -> None:
    """A problem with one adapter: console, the generation's comments, and a popup when enabled."""
    print(f"[sd-webui-tune] {message}")
    try:
        from modules import sd_hijack
        sd_hijack.model_hijack.comments.append(f"Tune: {message}")
    except Exception:
        pass
    if getattr(shared.opts, "tune_warn_in_ui", True):
        try:
            import gradio as gr
            gr.Warning(f"Tune: {message}")
        except Exception:  # outside a gradio request (API calls) there is no popup
            pass


def _embedding_data(emb, sd_model) -> dict:
    """Our Embedding -> the dict the webui's create_embedding_from_data understands."""
    v = emb.vectors
    if "clip_l" in v and "clip_g" in v:
        return {"clip_l": v["clip_l"], "clip_g": v["clip_g"]}
    return {"string_to_param": {"*": next(iter(v.values()))}}


def _tag_names(p) -> Dict[int, str]:
    """id(ExtraNetworkParams) -> the tag's network name as written (tune, lora, lyco): one instance serves them
    all, and messages should name the tag the user wrote."""
    out: Dict[int, str] = {}
    for data in (getattr(p, "extra_network_data", None), getattr(p, "hr_extra_network_data", None)):
        for name, params_list in (data or {}).items():
            for params in params_list:
                out[id(params)] = name
    return out


class ExtraNetworkTune(extra_networks.ExtraNetwork):
    def __init__(self, name: str = "tune"):
        super().__init__(name)
        self._registered_embeddings: List[str] = []

    def activate(self, p, params_list):
        rt = runtime()
        requests = []
        tag_names = _tag_names(p)
        for params in params_list:
            network = tag_names.get(id(params), self.name)
            try:
                req = parse_params(params.items, network=network,
                                   default_weight=float(getattr(shared.opts, "tune_default_weight", 1.0)))
            except TagError as e:
                warn(str(e))
                continue
            if req.extra:
                warn(f"<{network}:{req.raw}>: ignored unknown argument(s) {', '.join(req.extra)}")
            requests.append(req)
        hires = bool(getattr(p, "is_hr_pass", False))
        self._unregister_embeddings()
        act = rt.activate(shared.sd_model, requests, hires=hires)
        for w in act.warnings:
            warn(w)
        self._register_embeddings(act.embeddings)
        self.pending_embeddings = act.embeddings
        if act.active:
            p.extra_generation_params["Tune"] = tune_infotext.format_adapters([a.request for a in act.active])
            if getattr(shared.opts, "tune_hashes_to_infotext", True):
                p.extra_generation_params["Tune hashes"] = tune_infotext.format_hashes(
                    {a.request.name: a.entry.shorthash for a in act.active})

    def deactivate(self, p):
        runtime().deactivate()
        self._unregister_embeddings()
        self.pending_embeddings = {}

    def reassert_embeddings(self):
        """Register our bundled embeddings again after every extra network has activated: the built-in Lora
        unregisters the bundled embeddings of its previous generation by name when it activates, which would
        drop ours if it runs after us (called from the always-on script's process_batch)."""
        pending = getattr(self, "pending_embeddings", None)
        if pending:
            self._registered_embeddings = []
            self._register_embeddings(pending)

    def _register_embeddings(self, embeddings: Dict[str, object]):
        if not embeddings:
            return
        from modules import sd_hijack
        from modules.textual_inversion import textual_inversion
        db = sd_hijack.model_hijack.embedding_db
        for name, emb in embeddings.items():
            if name in db.word_embeddings and name not in self._registered_embeddings:
                log.info("bundled embedding %s skipped: already loaded from the embeddings folder", name)
                continue
            e = textual_inversion.create_embedding_from_data(_embedding_data(emb, shared.sd_model), name,
                                                             filename=f"tune/{name}")
            if db.expected_shape == -1 or db.expected_shape == e.shape:
                db.register_embedding(e, shared.sd_model)
                self._registered_embeddings.append(name)
            else:
                warn(f"bundled embedding '{name}' has width {e.shape}, the model needs {db.expected_shape}")

    def _unregister_embeddings(self):
        if not self._registered_embeddings:
            return
        from modules import sd_hijack
        db = sd_hijack.model_hijack.embedding_db
        for name in self._registered_embeddings:
            db.register_embedding_by_name(None, shared.sd_model, name)
        self._registered_embeddings = []


def on_cfg_denoiser(params):
    rt = _runtime
    if rt is not None and rt.current:
        rt.set_step(params.sampling_step, params.total_sampling_steps)


def on_infotext_pasted(infotext, d):
    """Hashes in infotext -> the adapter's current name, so pasted prompts find renamed files."""
    hashes = d.get("Tune hashes")
    if not hashes or "Prompt" not in d:
        return
    try:
        d["Prompt"] = tune_infotext.restore_prompt(d["Prompt"], d.get("Tune"), hashes,
                                                   lookup_hash=lambda h: getattr(runtime().library.by_hash(h), "name", None))
    except Exception as e:  # never break pasting
        log.warning("could not restore tune tags from infotext: %s", e)


_instances: List[ExtraNetworkTune] = []


def reassert_embeddings():
    for net in _instances:
        net.reassert_embeddings()


def register_extra_network():
    net = ExtraNetworkTune("tune")
    _instances[:] = [net]
    extra_networks.register_extra_network(net)


def take_over_lora_tags(*_args):
    """With the setting on, serve `<lora:>`/`<lyco:>`. Runs on app_started, not before_ui: the webui runs the
    before_ui callbacks in reverse order of registration (script_callbacks.before_ui_callback), so the built-in
    Lora's, registered before any extension's, runs last there and would register its own "lora" over ours.
    app_started comes after before_ui on every start and UI reload, in the UI and in --nowebui mode alike.

    The `tune` instance itself is registered under "lora" (and the alias "lyco"): the webui groups a batch's tags
    by instance, so `<tune:a>` and `<lora:b>` reach one activate() together; two instances would each replace
    the other's adapters in the one shared runtime."""
    if not getattr(shared.opts, "tune_handle_lora_tags", False) or not _instances:
        return
    net = _instances[0]
    if extra_networks.extra_network_registry.get("lora") is net:
        return
    extra_networks.extra_network_registry["lora"] = net
    extra_networks.register_extra_network_alias(net, "lyco")
    print("[sd-webui-tune] serving <lora:...> and <lyco:...> tags (setting 'Also handle <lora:...> tags')")


def setup():
    script_callbacks.on_before_ui(register_extra_network, name="sd-webui-tune extra network")
    script_callbacks.on_app_started(take_over_lora_tags, name="sd-webui-tune lora tags")
    script_callbacks.on_cfg_denoiser(on_cfg_denoiser, name="sd-webui-tune step weights")
    script_callbacks.on_infotext_pasted(on_infotext_pasted, name="sd-webui-tune infotext")
    script_callbacks.on_model_loaded(lambda _m: runtime().targets_of(shared.sd_model) if _runtime else None,
                                     name="sd-webui-tune model loaded")
