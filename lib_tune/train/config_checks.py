"""The checks of a job config's values (TrainConfig.validate, the stages of a staged plan, the names in API
requests) and the error they raise, ConfigError, which names the field: the API answers 422 with it and the Tune
tab shows it. Messages quote the bad value briefly (`show`), also for hostile input (huge integers, deep nesting,
long strings).
"""
import re
import reprlib

#: device names Windows reserves in every folder, with or without an extension, in any case
WINDOWS_RESERVED = frozenset(["CON", "PRN", "AUX", "NUL"] + [f"COM{i}" for i in range(1, 10)]
                             + [f"LPT{i}" for i in range(1, 10)])
#: longest output_name in UTF-8 bytes: suffixes (-best, -state, -000123, .safetensors) must still fit in the 255
#: bytes of a file name
MAX_NAME_BYTES = 200


class ConfigError(ValueError):
    """A bad job config; `field` names the offending field (the API answers 422 with it)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 2, 60, 60, 6, 4


def show(value) -> str:
    """A short repr for messages: nested and long values abbreviated, huge integers described (Python refuses to
    print integers of more than 4300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    try:
        return _REPR.repr(value)
    except (ValueError, RecursionError):
        return f"a {type(value).__name__}"


def check_file_name(name: str, value: str) -> None:
    """A plain file name (the stem of the adapter file) that works on Linux, macOS and Windows."""
    if "\0" in value:
        raise ConfigError(name, "must not contain NUL bytes")
    if "/" in value or "\\" in value:
        raise ConfigError(name, "must be a file name, not a path (no / or \\)")
    if value.strip() in (".", ".."):
        raise ConfigError(name, f"{value.strip()!r} is not a file name")
    if re.search(r"[:*?\"<>|\x00-\x1f\x7f]", value):
        raise ConfigError(name, "must be a file name without reserved characters (: * ? \" < > | or control "
                                "characters)")
    if value.split(".")[0].rstrip(" ").upper() in WINDOWS_RESERVED:
        raise ConfigError(name, f"{value!r} is a device name Windows reserves (CON, PRN, AUX, NUL, COM1-9, "
                                f"LPT1-9, with any extension)")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise ConfigError(name, f"is too long for a file name (at most {MAX_NAME_BYTES} bytes)")


def check_name(name: str, value, allow_folders: bool = False) -> None:
    """An adapter or output name from a request: a file name (`allow_folders`: the name of an existing adapter,
    sub-folders separated by '/', any characters a file system allows, but never absolute, never '..' or '.'
    components, no NUL and no Windows device names); ConfigError naming the field otherwise."""
    check_str(name, value, required=True)
    if not allow_folders:
        check_file_name(name, value)
        return
    if "\0" in value:
        raise ConfigError(name, "must not contain NUL bytes")
    if value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value):
        raise ConfigError(name, "must be a name relative to the Lora folder, not an absolute path")
    for part in value.split("/"):  # a file that exists may have any other character in its name
        if part.strip() in ("", ".", ".."):
            raise ConfigError(name, f"must not contain {part.strip() or 'empty'!r} path components")
        if part.split(".")[0].rstrip(" ").upper() in WINDOWS_RESERVED:
            raise ConfigError(name, f"{part!r} is a device name Windows reserves (CON, PRN, AUX, NUL, COM1-9, "
                                    f"LPT1-9, with any extension)")


def check_path(name: str, value) -> None:
    """A folder: absolute or relative, but no NUL bytes and no '..' components."""
    check_str(name, value)
    if "\0" in value:
        raise ConfigError(name, "must not contain NUL bytes")
    if any(part.strip() == ".." for part in re.split(r"[\\/]", value)):
        raise ConfigError(name, "must not contain '..' components; give the folder's own path")


def check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(name, f"must be one of {', '.join(choices)}, not {show(value)}")


def check_str(name: str, value, required: bool = False) -> None:
    if not isinstance(value, str):
        raise ConfigError(name, f"must be a string, not {type(value).__name__}")
    if required and not value.strip():
        raise ConfigError(name, "is required")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(name, f"must be true or false, not {show(value)}")


def check_int(name: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an integer, not {show(value)}")
    if not lo <= value <= hi:
        raise ConfigError(name, f"must be between {lo} and {hi}, not {show(value)}")


def check_float(name: str, value, lo: float, hi: float, open_low: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ConfigError(name, f"must be a number, not {show(value)}")
    if value < lo or value > hi or (open_low and value == lo):
        raise ConfigError(name, f"must be {'>' if open_low else '>='} {lo} and <= {hi}, not {show(value)}")
