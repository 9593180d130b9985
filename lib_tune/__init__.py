"""sd-webui-tune engine.

Everything here except `lib_tune.webui` and `lib_tune.ui` imports and runs without the webui."""
__version__ = "0.1.0"
