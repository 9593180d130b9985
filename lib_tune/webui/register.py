"""Registers sd-webui-tune with the webui: settings, the Tune tab, the `tune` extra network and its page, API
routes.

Kept cheap at import (the webui imports it at start-up): heavy parts are imported inside the callbacks.
"""
from modules import script_callbacks, shared

from . import networks, settings


def _on_ui_settings():
    for key, info in settings.options().items():
        shared.opts.add_option(key, info)


def _on_ui_tabs():
    from ..ui import tab
    return [(tab.build(), "Tune", "tune_tab")]


def _on_before_ui():
    from ..ui import extra_page
    extra_page.register()


def _on_app_started(_demo, app):
    from . import api
    api.add_routes(app)


def setup():
    networks.setup()
    script_callbacks.on_ui_settings(_on_ui_settings, name="sd-webui-tune settings")
    script_callbacks.on_before_ui(_on_before_ui, name="sd-webui-tune extra networks page")
    script_callbacks.on_ui_tabs(_on_ui_tabs, name="sd-webui-tune tab")
    script_callbacks.on_app_started(_on_app_started, name="sd-webui-tune api")
