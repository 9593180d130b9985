"""Glue between the webui and the engine; with lib_tune.ui (the gradio blocks), the only package of lib_tune that
imports the webui's `modules`."""
