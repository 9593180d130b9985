"""The extra-networks "Tune" page (lib_tune/ui/extra_page.py) and the link from the webui's Train tab, in a real
browser: cards for the Lora folder's adapters (a sub-folder button, a preview image), the search box, a click on a
card writes its tag into the txt2img prompt, the metadata viewer and the webui's user-metadata editor open for a
card with ss_* metadata. Screenshots go to the output_dir (extra-page-*.png, train-tab-*.png).

Waits are generous (a slow, shared 2-core CPU): each waits for a state the UI must reach, never for a time.
"""
import io
import json

import pytest

from .browser import page

FOLDER = "xpage"  # in the host's Lora folder; stems below are unique in the session
STEMS = {"lora": "xpage-lora", "loha": "xpage-loha", "te_only": "xpage-sub-te"}
SUB = "deeper"  # sub-folder of FOLDER holding the te_only file
LONG_MS = 180_000


def _png(path, color):
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def page_files(webui, checkpoints, tmp_path_factory):
    """Three SD1 adapters in <Lora>/xpage (one in xpage/deeper), the first with a preview PNG beside it."""
    from tests.fixtures import adapters
    tmp = tmp_path_factory.mktemp("xpage-src")
    corpus = adapters.write_corpus("sd1", checkpoints["sd1"], tmp, cases=list(STEMS))
    root = webui.lora_dir / FOLDER
    out = {}
    for case, stem in STEMS.items():
        dst = root / SUB / f"{stem}.safetensors" if case == "te_only" else root / f"{stem}.safetensors"
        out[case] = adapters.copy_as(corpus[case], dst)
    _png(out["lora"].with_suffix(".png"), (200, 30, 160))
    webui.post("/tune/v1/refresh")
    return out





def _open_tune_page(pg):
    """txt2img -> extra networks "Tune" tab, refreshed so that it lists the files written by this module."""
    pg.wait_for_selector("#txt2img_extra_tabs", timeout=LONG_MS)
    pg.locator("#tabs > .tab-nav button", has_text="txt2img").first.click()
    pg.locator("#txt2img_extra_tabs > .tab-nav button", has_text="Tune").first.click()
    pg.locator("#txt2img_tune").first.wait_for(state="visible", timeout=60_000)
    pg.locator("#txt2img_tune_extra_refresh").first.click()
    pg.wait_for_function(f"() => document.querySelectorAll('#txt2img_tune_cards .card[data-name*=\"{STEMS['lora']}\"]')"
                         ".length > 0", timeout=LONG_MS)


def _visible_cards(pg):
    return pg.evaluate("() => Array.from(document.querySelectorAll('#txt2img_tune_cards .card'))"
                       ".filter(c => !c.classList.contains('hidden') && c.offsetParent !== null)"
                       ".map(c => c.dataset.name)")


def _card(pg, stem):
    return pg.locator(f"#txt2img_tune_cards .card[data-name$='{stem}']").first


def test_tune_page_cards_search_preview_and_click(webui_js, page_files, output_dir):
    webui = webui_js
    webui.load_checkpoint("tiny-sd1")
    with page(webui.url) as pg:
        _open_tune_page(pg)
        names = _visible_cards(pg)
        for stem in STEMS.values():
            assert any(n.endswith(stem) for n in names), (stem, names)

        # the directory view lists the sub-folders (the built-in Lora page's "Dirs" buttons)
        if not pg.locator("#txt2img_tune_dirs").first.is_visible():
            pg.locator("#txt2img_tune_extra_tree_view").first.click()
        dirs = pg.locator("#txt2img_tune_dirs button")
        dirs.first.wait_for(state="visible", timeout=60_000)
        labels = [t.strip() for t in dirs.all_inner_texts()]
        assert "all" in labels and any(t.rstrip("/").endswith(f"{FOLDER}/{SUB}") for t in labels), labels
        pg.screenshot(path=str(output_dir / "extra-page-1-cards.png"), full_page=True)

        # a sub-folder button filters to its files
        pg.locator("#txt2img_tune_dirs button", has_text=f"{FOLDER}/{SUB}").first.click()
        pg.wait_for_function("() => Array.from(document.querySelectorAll('#txt2img_tune_cards .card'))"
                             ".filter(c => !c.classList.contains('hidden')).length === 1", timeout=60_000)
        assert [n for n in _visible_cards(pg)] and all(n.endswith(STEMS["te_only"]) for n in _visible_cards(pg))

        # the search box filters by name
        search = pg.locator("#txt2img_tune_extra_search").first
        search.fill("xpage-loha")
        search.dispatch_event("input")
        pg.wait_for_function("() => Array.from(document.querySelectorAll('#txt2img_tune_cards .card'))"
                             ".filter(c => !c.classList.contains('hidden')).length === 1", timeout=60_000)
        visible = _visible_cards(pg)
        assert len(visible) == 1 and visible[0].endswith(STEMS["loha"]), visible
        pg.screenshot(path=str(output_dir / "extra-page-2-search.png"), full_page=True)
        search.fill("")
        search.dispatch_event("input")
        pg.wait_for_function("() => Array.from(document.querySelectorAll('#txt2img_tune_cards .card'))"
                             f".filter(c => !c.classList.contains('hidden')).length >= {len(STEMS)}", timeout=60_000)

        # the preview PNG beside the file is the card's image, served by the webui (it loaded: naturalWidth > 0)
        img = _card(pg, STEMS["lora"]).locator("img.preview").first
        img.scroll_into_view_if_needed()
        pg.wait_for_function("s => { const i = document.querySelector(`#txt2img_tune_cards .card[data-name$='${s}'] "
                             "img.preview`); return i && i.complete && i.naturalWidth === 64; }", arg=STEMS["lora"],
                             timeout=60_000)
        assert "xpage-lora.png" in (img.get_attribute("src") or "")
        assert _card(pg, STEMS["loha"]).locator("img.preview").count() == 0

        # a click on a card writes its tag into the prompt (default multiplier 1), a second click takes it out
        area = pg.locator("#txt2img_prompt textarea").first
        area.fill("a photo of a cat")
        _card(pg, STEMS["lora"]).click(position={"x": 20, "y": 20})
        pg.wait_for_function("() => document.querySelector('#txt2img_prompt textarea').value.includes('<tune:')",
                             timeout=30_000)
        prompt = area.input_value()
        assert prompt.startswith("a photo of a cat") and f"<tune:{STEMS['lora']}:1>" in prompt, prompt
        pg.screenshot(path=str(output_dir / "extra-page-3-clicked.png"), full_page=True)
        _card(pg, STEMS["lora"]).click(position={"x": 20, "y": 20})
        pg.wait_for_function("() => !document.querySelector('#txt2img_prompt textarea').value.includes('<tune:')",
                             timeout=30_000)

        # the tag the card wrote generates with our engine (infotext names the adapter)
        r = webui.txt2img(f"a photo of a cat <tune:{STEMS['lora']}:1>", seed=2)
        info = json.loads(r["info"])
        assert STEMS["lora"] in info["infotexts"][0] and "Tune hashes" in info["infotexts"][0], info["infotexts"][0]


def test_tune_page_metadata_viewer_and_editor(webui_js, page_files, output_dir):
    webui = webui_js
    webui.load_checkpoint("tiny-sd1")
    with page(webui.url) as pg:
        _open_tune_page(pg)
        card = _card(pg, STEMS["lora"])
        card.hover()

        # the metadata viewer: the file's ss_* metadata in the webui's popup
        card.locator(".metadata-button").first.click()
        popup = pg.locator(".global-popup").first
        popup.wait_for(state="visible", timeout=60_000)
        pg.wait_for_function("() => (document.querySelector('.global-popup-inner')?.innerText || '')"
                             ".includes('ss_network_module')", timeout=60_000)
        text = pg.locator(".global-popup-inner").first.inner_text()
        assert "ss_output_name" in text and STEMS["lora"] in text and "networks.lora" in text, text[:2000]
        assert "error getting metadata" not in text
        pg.screenshot(path=str(output_dir / "extra-page-4-metadata.png"), full_page=True)
        # the close button sits under the table of a long metadata list: dispatch its click (a person scrolls)
        pg.locator(".global-popup-close").first.dispatch_event("click")
        popup.wait_for(state="hidden", timeout=30_000)

        # the user-metadata editor: the built-in Lora's editor (ss_* table, activation text, preferred weight)
        card.hover()
        card.locator(".edit-button").first.click()
        editor = pg.locator("#txt2img_tune_edit_user_metadata").first
        editor.wait_for(state="visible", timeout=60_000)
        pg.wait_for_function("s => (document.querySelector('#txt2img_tune_edit_user_metadata')?.innerText || '')"
                             ".includes(s)", arg=STEMS["lora"], timeout=60_000)
        text = editor.inner_text()
        assert "Activation text" in text and "Preferred weight" in text, text[:2000]
        # the built-in's ss_* table (it reads ss_dataset_dirs / ss_tag_frequency as parsed JSON, as the webui does)
        assert "Kohya module:" in text and "networks.lora" in text and "Dataset size:" in text, text[:2000]
        pg.screenshot(path=str(output_dir / "extra-page-5-editor.png"), full_page=True)

        # saving an activation text and a preferred weight changes what the card writes
        act = editor.locator("label", has_text="Activation text").locator("textarea, input").first
        act.fill("zkw style")
        weight = editor.locator("label", has_text="Preferred weight").locator("xpath=..").locator(
            "input[type=number]").first
        weight.fill("0.7")
        weight.dispatch_event("blur")
        editor.locator("button", has_text="Save").first.click()
        editor.wait_for(state="hidden", timeout=60_000)
        meta = page_files["lora"].with_suffix(".json")  # the webui's user metadata, beside the file
        for _ in range(120):
            if meta.exists() and "zkw style" in meta.read_text():
                break
            pg.wait_for_timeout(500)
        assert meta.exists() and "zkw style" in meta.read_text(), "the editor did not write the user metadata"
        assert json.loads(meta.read_text())["preferred weight"] == 0.7
        area = pg.locator("#txt2img_prompt textarea").first
        area.fill("")
        pg.wait_for_function(
            "s => (document.querySelector(`#txt2img_tune_cards .card[data-name$='${s}']`)?.getAttribute('onclick') "
            "|| '').includes('zkw style')", arg=STEMS["lora"], timeout=60_000)
        _card(pg, STEMS["lora"]).click(position={"x": 20, "y": 20})
        pg.wait_for_function("() => document.querySelector('#txt2img_prompt textarea').value.includes('<tune:')",
                             timeout=30_000)
        prompt = area.input_value()
        assert f"<tune:{STEMS['lora']}:0.7>" in prompt and "zkw style" in prompt, prompt
        pg.screenshot(path=str(output_dir / "extra-page-6-edited.png"), full_page=True)


def test_train_tab_links_to_tune_tab(webui_js, output_dir):
    with page(webui_js.url) as pg:
        pg.wait_for_selector("#tabs", timeout=LONG_MS)
        pg.locator("#tabs > .tab-nav button", has_text="Train").first.click()
        link = pg.locator("#tab_train #tune_train_link").first
        link.wait_for(state="visible", timeout=60_000)
        assert "Train LoRA / LyCORIS / TI with sd-webui-tune" in link.inner_text()
        pg.screenshot(path=str(output_dir / "train-tab-1-link.png"), full_page=True)
        link.click()
        pg.locator("#tune_status").first.wait_for(state="visible", timeout=60_000)
        assert not pg.locator("#tab_train").first.is_visible()
        selected = pg.locator("#tabs > .tab-nav button.selected").first.inner_text()
        assert selected.strip() == "Tune", selected
        pg.screenshot(path=str(output_dir / "train-tab-2-tune.png"), full_page=True)
