"""Where Stability's ``sgm`` package (SDXL's classes) comes from when the tiny SDXL model is built.

``ldm`` is an installable package (stable-diffusion-sdkit; a webui has it in repositories/), ``sgm`` is not: it is
taken from $SD_WEBUI_PATH/repositories/generative-models (linked), else unpacked once from the generative-models
source tarball of a shared folder beside the checkout (``$TUNE_SHARED``, ``../shared``, ``/work/shared``) into
~/.cache/sd-webui-tune. Only the ``sgm`` folder goes on sys.path, so the repository's own ``tests``/``scripts``
packages can never shadow anything.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
SGM_TARBALL = "webui-src/generative-models.tar.gz"
NO_SGM = ("no sgm package: set SD_WEBUI_PATH to a webui with repositories/generative-models, or provide "
          f"../shared/{SGM_TARBALL}")


def _shared_candidates() -> list[Path]:
    env = os.environ.get("TUNE_SHARED")
    cands = [Path(env)] if env else []
    return cands + [REPO.parent / "shared", Path("/work/shared")]


def find_sgm_path() -> Optional[Path]:
    """A folder holding only the ``sgm`` package (so that putting it on sys.path adds nothing else, e.g. the
    generative-models repository's own ``tests``/``scripts`` packages), or None.

    Taken from $SD_WEBUI_PATH/repositories/generative-models (linked), else unpacked once from the shared
    generative-models tarball into ~/.cache/sd-webui-tune/sgm-<hash>."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sd-webui-tune"
    webui = os.environ.get("SD_WEBUI_PATH")
    if webui and (Path(webui) / "repositories/generative-models/sgm/__init__.py").exists():
        sgm = (Path(webui) / "repositories/generative-models/sgm").resolve()
        dest = cache / f"sgm-link-{hashlib.sha256(str(sgm).encode()).hexdigest()[:12]}"
        if not (dest / "sgm").exists():
            _publish(dest, lambda tmp: (tmp / "sgm").symlink_to(sgm, target_is_directory=True))
        return dest
    for shared in _shared_candidates():
        tarball = shared / SGM_TARBALL
        if tarball.is_file():
            dest = cache / f"sgm-{hashlib.sha256(tarball.read_bytes()).hexdigest()[:12]}"
            if not (dest / "sgm" / "__init__.py").exists():
                _publish(dest, lambda tmp: _extract_sgm(tarball, tmp))
            return dest
    return None


def _extract_sgm(tarball: Path, into: Path) -> None:
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if m.name.lstrip("./").startswith("sgm/") and (m.isfile() or m.isdir())]
        tar.extractall(into, members=members)


def _publish(dest: Path, fill) -> None:
    """Fill a temporary sibling folder and rename it into place, so parallel sessions never see half a copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        fill(tmp)
        try:
            tmp.rename(dest)
        except OSError:  # another session won the race (dest exists): use theirs
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sgm_path() -> Path:
    """``find_sgm_path()``, or FileNotFoundError saying where sgm may come from."""
    found = find_sgm_path()
    if found is None:
        raise FileNotFoundError(NO_SGM)
    return found


def import_sgm():
    """Make ``import sgm`` work (appended to sys.path, so it never shadows anything) and return the module."""
    path = str(sgm_path())
    if path not in sys.path:
        sys.path.append(path)
    import sgm

    return sgm
