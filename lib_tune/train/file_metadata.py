"""Old path of run_metadata.py, kept only for train/loop.py until its rewrite imports the new one; remove then."""
from .run_metadata import file_metadata  # noqa: F401
