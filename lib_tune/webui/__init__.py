"""The only package of lib_tune that imports the webui's `modules`: glue between the webui and the engine."""
