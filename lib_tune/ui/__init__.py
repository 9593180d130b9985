"""Gradio blocks of the extension (may import the webui's modules)."""
