"""What the extension needs beyond the webui, pinned. install.py installs what is missing.

Each entry: (import-checkable distribution name, pip spec). The webui v1.10.1 already provides torch,
safetensors, numpy, Pillow, gradio, fastapi, transformers, open_clip and psutil, which is all the engine uses,
so the list is empty today; a new entry must not name a package the webui pins (see
tests/unit/test_install.py). Optional accelerators are never installed: AdamW8bit is used when bitsandbytes is
present, Prodigy when prodigyopt is present.
"""
from typing import Callable, Iterable, List, Tuple

REQUIREMENTS: List[Tuple[str, str]] = []

#: packages the webui pins: install.py must never ask pip for these
WEBUI_PINNED = {
    "torch", "torchvision", "gradio", "transformers", "numpy", "safetensors", "pillow", "open-clip-torch",
    "pytorch_lightning", "pytorch-lightning", "accelerate", "fastapi", "omegaconf", "einops", "kornia",
    "protobuf", "setuptools", "psutil", "httpx", "httpcore", "lark", "spandrel", "torchsde", "torchdiffeq",
}


def missing(requirements: Iterable[Tuple[str, str]], is_installed: Callable[[str], bool]) -> List[str]:
    """The pip specs of the requirements that are not installed."""
    return [spec for name, spec in requirements if not is_installed(name)]
