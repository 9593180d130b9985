"""The always-on script: hooks into each batch after the extra networks have activated."""
from modules import scripts

from . import networks


class TuneScript(scripts.Script):
    def title(self):
        return "sd-webui-tune"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process_batch(self, p, *args, **kwargs):
        networks.reassert_embeddings()
