"""The "Tune" page of the webui's extra-networks browser: the Lora folder's adapters as cards.

Cards insert `<tune:name:weight>` (with the user's activation text and preferred weight from the card's
metadata editor), show the file's `ss_*`/`modelspec.*` metadata, and are hidden when made for another SD version
than the loaded model (unless the webui's "show all" setting for Lora is on).
"""
import json
import os
import sys

from modules import shared, ui_extra_networks
from modules.ui_extra_networks import quote_js

from ..formats.arch import ARCH_NAMES
from ..webui import networks


def webui_metadata(metadata):
    """A file's metadata as the webui holds it (sd_models.read_metadata_from_safetensors): string values that are
    JSON objects parsed (ss_tag_frequency, ss_dataset_dirs, ss_bucket_info), which the built-in Lora's metadata
    editor reads as dicts (its ss_* table and training tags)."""
    out = {}
    for k, v in (metadata or {}).items():
        out[k] = v
        if isinstance(v, str) and v[0:1] == "{":
            try:
                out[k] = json.loads(v)
            except ValueError:
                pass
    return out


def _model_version():
    m = shared.sd_model
    if m is None:
        return None
    return "SDXL" if getattr(m, "is_sdxl", False) else "SD2" if getattr(m, "is_sd2", False) else "SD1"


class ExtraNetworksPageTune(ui_extra_networks.ExtraNetworksPage):
    def __init__(self):
        super().__init__("Tune")

    def refresh(self):
        networks.runtime().library.refresh()

    def create_item(self, name, index=None, enable_filter=True):
        entry = networks.runtime().library.find(name)
        if entry is None:
            return None
        path, _ext = os.path.splitext(entry.path)
        search_terms = [self.search_terms_from_path(entry.path)]
        if entry.alias:
            search_terms.append(entry.alias)
        version = ARCH_NAMES.get(entry.architecture or "", "Unknown")
        item = {
            "name": name,
            "filename": entry.path,
            "preview": self.find_preview(path) or self.find_embedded_preview(path, name, entry.metadata),
            "description": self.find_description(path),
            "search_terms": search_terms,
            "local_preview": f"{path}.{shared.opts.samples_format}",
            "metadata": webui_metadata(entry.metadata),
            "sort_keys": {"default": index, **self.get_sort_keys(entry.path)},
            "sd_version": version,
        }
        self.read_user_metadata(item)
        um = item["user_metadata"]
        weight = um.get("preferred weight") or 0.0
        item["prompt"] = (quote_js(f"<tune:{entry.alias or name}:") + " + "
                          + (str(weight) if weight else "opts.extra_networks_default_multiplier") + " + " + quote_js(">"))
        if um.get("activation text"):
            item["prompt"] += " + " + quote_js(" " + um["activation text"])
        item["negative_prompt"] = quote_js("(" + um["negative text"] + ":1)") if um.get("negative text") else quote_js("")
        if um.get("sd version") in ("SD1", "SD2", "SDXL"):
            version = um["sd version"]
            item["sd_version"] = version
        model = _model_version()
        if enable_filter and model and version != "Unknown" and version != model \
                and not getattr(shared.opts, "lora_show_all", False):
            return None
        return item

    def list_items(self):
        for index, entry in enumerate(networks.runtime().library.list()):
            try:
                item = self.create_item(entry.name, index)
            except Exception as e:  # one odd file (metadata, preview, name) never empties the page
                print(f"[Tune] no card for {entry.path!r}: {type(e).__name__}: {e}")
                continue
            if item is not None:
                yield item

    def allowed_directories_for_previews(self):
        return networks.lora_dirs()

    # The webui builds the folder buttons and the tree by walking the Lora folder itself, following symlinks
    # without a guard (os.walk(followlinks=True), a recursive listdir): one looping symlink in the folder makes
    # the page never render. Ours come from the cards' own paths (what the library scanned, loops skipped), so
    # they list exactly the folders that hold adapters.
    def _folders(self):
        """{root: sorted relative folders (with their parents) that hold at least one card}"""
        out = {}
        for root in [os.path.abspath(x) for x in self.allowed_directories_for_previews()]:
            found = set()
            for item in self.items.values():
                rel = os.path.relpath(os.path.dirname(os.path.abspath(item["filename"])), root)
                if rel == "." or rel.startswith(".."):
                    continue
                parts = rel.split(os.sep)
                found.update(os.sep.join(parts[:i]) for i in range(1, len(parts) + 1))
            out[root] = sorted(found, key=shared.natural_sort_key)
        return out

    def create_dirs_view_html(self, tabname):
        import html
        subdirs = []
        for _root, folders in self._folders().items():
            for rel in folders:
                sub = os.sep + rel if shared.opts.extra_networks_dir_button_function else rel
                if (os.sep + "." in os.sep + rel) and not shared.opts.extra_networks_show_hidden_directories:
                    continue
                subdirs.append(sub + os.sep)
        if subdirs:
            subdirs = [""] + list(dict.fromkeys(subdirs))
        return "".join(f"""
        <button class='lg secondary gradio-button custom-button{" search-all" if d == "" else ""}' onclick='extraNetworksSearchButton("{tabname}", "{self.extra_networks_tabname}", event)'>
        {html.escape(d if d != "" else "all")}
        </button>
        """ for d in subdirs)

    def create_tree_view_html(self, tabname):
        by_file = {v["filename"]: v for v in self.items.values()}
        res = ""
        for root in [os.path.abspath(x) for x in self.allowed_directories_for_previews()]:
            tree = {}  # keys relative to the root's parent, as the webui's get_tree makes them
            for path, item in by_file.items():
                if os.path.relpath(os.path.abspath(path), root).startswith(".."):
                    continue
                rel = os.path.relpath(os.path.abspath(path), os.path.dirname(root))
                node = tree
                parts = rel.split(os.sep)
                for i in range(len(parts) - 1):
                    node = node.setdefault(os.sep.join(parts[:i + 1]), {})
                node[rel] = item
            for k, v in sorted(tree.items(), key=lambda x: shared.natural_sort_key(x[0])):
                res += self.create_tree_dir_item_html(tabname, k, self._tree_html(tabname, v)) or ""
        return f"<ul class='tree-list tree-list--tree'>{res}</ul>" if res else ""

    def _tree_html(self, tabname, node):
        dirs, files = [], []
        for k, v in sorted(node.items(), key=lambda x: shared.natural_sort_key(x[0])):
            if isinstance(v, dict) and "filename" not in v:
                dirs.append(self.create_tree_dir_item_html(tabname, k, self._tree_html(tabname, v)))
            else:
                files.append(self.create_tree_file_item_html(tabname, k, v))
        return "".join(x for x in dirs if x) + "".join(files) or None

    def create_user_metadata_editor(self, ui, tabname):
        # the built-in Lora's editor (ss_* table, tags, activation text, preferred weight) when it is loaded
        builtin = sys.modules.get("ui_edit_user_metadata")
        if builtin is not None and hasattr(builtin, "LoraUserMetadataEditor"):
            return builtin.LoraUserMetadataEditor(ui, tabname, self)
        return super().create_user_metadata_editor(ui, tabname)


def register():
    ui_extra_networks.register_page(ExtraNetworksPageTune())
