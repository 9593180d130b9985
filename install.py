"""Run by the webui at start-up (modules/launch_utils.run_extension_installer).

Installs what lib_tune needs beyond the webui's own requirements, pinned, and only when missing. It never
touches torch, torchvision, gradio, transformers or any other package the webui pins: the list below must
stay disjoint from the webui's requirements_versions.txt (tests/unit/test_install.py checks it).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lib_tune.requirements import REQUIREMENTS, missing  # noqa: E402

import launch  # noqa: E402  (the webui's launch module; only importable inside the webui)

for spec in missing(REQUIREMENTS, launch.is_installed):
    launch.run_pip(f"install {spec}", f"sd-webui-tune requirement: {spec}")
