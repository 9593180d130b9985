"""The e2e layer: one real webui per session, with the tiny checkpoints and this extension linked in."""
import urllib.error
import urllib.request

import pytest

from . import host as webui_host


def pytest_collection_modifyitems(config, items):
    reason = webui_host.skip_reason()
    if reason is None:
        return
    marker = pytest.mark.skip(reason=f"e2e: {reason}")
    for item in items:
        if "tests/e2e/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(marker)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """The tiny SD1, SD2-v and SDXL checkpoints (with their .yaml) in one folder: {arch: path}."""
    from tests.fixtures import tiny_models
    folder = tmp_path_factory.mktemp("ckpt")
    return {arch: tiny_models.write_checkpoint(arch, folder, seed=0) for arch in ("sd1", "sd2v", "sdxl")}


@pytest.fixture(scope="session")
def webui(tmp_path_factory, checkpoints):
    """A running webui with the extension, the tiny SD1 checkpoint loaded, stopped by PID at the end."""
    work = tmp_path_factory.mktemp("webui")
    ckpt_dir = checkpoints["sd1"].parent
    host = webui_host.WebuiHost(work, ckpt_dir, extension=True, ckpt=checkpoints["sd1"])
    try:
        host.start()
        # SDXL live previews would download a VAE approximation: keep previews cheap and offline
        host.set_options(live_previews_enable=False, show_progress_type="Approx cheap")
        yield host
    finally:
        host.stop()


@pytest.fixture(scope="module")
def webui_js(webui):
    """The webui's own javascript must be served for its UI (and ours) to work at all."""
    try:
        with urllib.request.urlopen(webui.url + "/file=script.js", timeout=30) as r:
            r.read(1)
    except urllib.error.HTTPError as e:
        pytest.skip(f"the webui does not serve its own script.js (HTTP {e.code}): gradio 3.41 refuses every file "
                    f"whose path has a folder starting with '.', e.g. a webui under ~/.cache; run it from {webui.root} "
                    f"copied to a path without dot-folders")
    return webui
