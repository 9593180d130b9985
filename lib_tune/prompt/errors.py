"""Errors of the prompt grammar.

They are ValueErrors so that generic callers can catch them, and they carry a message written for the user:
the webui layer shows it as a warning and skips only the adapter whose tag was wrong (never the whole
generation), which is why nothing in this package lets a bare float()/int() exception escape."""


class TagError(ValueError):
    """A `<tune:...>` tag (or one of its values) that cannot be understood; the message quotes the tag."""


class InfotextError(ValueError):
    """A `Tune` / `Tune hashes` infotext value that does not follow the format written by infotext.py."""
