"""sd-webui-tune: the only module the webui imports directly. Registration only; the engine is lib_tune."""
import os
import sys

# The webui puts an extension's folder on sys.path only while it imports its scripts; lib_tune imports lazily
# later (training, tools), so keep the folder importable.
_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _root not in sys.path:
    sys.path.append(_root)

from lib_tune.webui import register  # noqa: E402
from lib_tune.webui.script import TuneScript  # noqa: E402,F401  (the webui finds Script classes here)

register.setup()
