"""Old path of kohya_metadata.py, kept only for train/loop.py until its rewrite imports the new one; remove then."""
from .kohya_metadata import add_hashes  # noqa: F401
