"""The UI in a real browser shows the Tune tab with its status panel."""
from .browser import page


def test_tune_tab_in_browser(webui, output_dir):
    with page(webui.url) as pg:
        pg.wait_for_selector("#tabs", timeout=60000)
        tab_button = pg.locator("#tabs > .tab-nav button", has_text="Tune").first
        tab_button.wait_for(timeout=30000)
        tab_button.click()
        status = pg.locator("#tune_status").first
        status.wait_for(state="visible", timeout=30000)
        text = status.inner_text()
        pg.screenshot(path=str(output_dir / "e2e-tune-tab.png"))
        assert "sd-webui-tune" in text and "SD" in text, text
