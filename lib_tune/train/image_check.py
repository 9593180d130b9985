"""Is an image file complete? A structural check per call, independent of Pillow's process-wide switch.

Pillow decodes a truncated file silently (grey fill) when anything in the process set
`PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True`, and in a webui something may have (BLIP does, other extensions
do). Flipping that global back for the length of a decode would race with every other thread that decodes
images. So the completeness of the container is checked here, from the bytes, before Pillow decodes:

- PNG: every chunk is whole, its CRC matches, and IEND is reached;
- JPEG: the segments up to the first scan are whole and an end-of-image marker follows the scan;
- WebP: the RIFF size covers the file's payload;
- BMP: the pixel array (offset + rows × padded stride, or the stated RLE size) lies inside the file;
- GIF: the trailer byte ends the stream.

`incomplete(path)` returns the reason in words, or None when the container is whole (or of a format not
checked here: Pillow's own strict decoding then decides).
"""
from __future__ import annotations

import errno
import os
import stat
import struct
import zlib
from typing import Optional

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_MAGICS = (PNG_MAGIC, b"\xff\xd8", b"RIFF", b"BM", b"GIF87a", b"GIF89a")


def incomplete(path: str) -> Optional[str]:
    why = not_a_file(path)
    if why:
        return why
    with open(path, "rb") as f:
        data = f.read()
    return incomplete_bytes(data)


def not_a_file(path: str) -> Optional[str]:
    """Why `path` cannot be read as an image file (a pipe would block a reader forever), or None."""
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop"
        if e.errno == errno.ENOENT:
            return "a broken symlink or a file removed meanwhile"
        return f"cannot read it ({e.strerror or e})"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a pipe, socket, device or folder)"
    return None


def incomplete_bytes(data: bytes) -> Optional[str]:
    if not data:
        return "the file is empty (0 bytes)"
    if len(data) < 12 and any(m.startswith(data) or data.startswith(m) for m in _MAGICS):
        return "truncated image (the file ends inside its header)"
    if data.startswith(PNG_MAGIC):
        return _png(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp(data)
    if data[:2] == b"BM":
        return _bmp(data)
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return None if data.rstrip(b"\x00").endswith(b";") else "truncated GIF (no trailer)"
    return None


def _png(data: bytes) -> Optional[str]:
    pos = len(PNG_MAGIC)
    while True:
        if pos + 8 > len(data):
            return "truncated PNG (ends inside a chunk header, no IEND)"
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 8 + length + 4
        if end > len(data):
            return f"truncated PNG (chunk {ctype!r} needs {end - len(data)} more bytes)"
        crc = struct.unpack(">I", data[end - 4:end])[0]
        if zlib.crc32(data[pos + 4:end - 4]) & 0xFFFFFFFF != crc:
            return f"damaged PNG (CRC mismatch in chunk {ctype!r})"
        if ctype == b"IEND":
            return None
        pos = end


def _jpeg(data: bytes) -> Optional[str]:
    pos = 2
    n = len(data)
    while True:
        while pos < n and data[pos] == 0xFF and pos + 1 < n and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes
        if pos + 4 > n:
            return "truncated JPEG (ends before the image data)"
        if data[pos] != 0xFF:
            return "damaged JPEG (no marker where a segment should start)"
        marker = data[pos + 1]
        if marker == 0xD9:
            return "damaged JPEG (end of image before any image data)"
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if length < 2 or pos + 2 + length > n:
            return "truncated JPEG (a segment runs past the end of the file)"
        if marker == 0xDA:  # start of scan: entropy-coded data follows, then (more scans and) EOI
            return None if data.find(b"\xff\xd9", pos + 2 + length) >= 0 \
                else "truncated JPEG (no end-of-image marker after the image data)"
        pos += 2 + length


def _webp(data: bytes) -> Optional[str]:
    (size,) = struct.unpack("<I", data[4:8])
    if 8 + size > len(data):
        return f"truncated WebP ({8 + size - len(data)} bytes missing)"
    return None


def _bmp(data: bytes) -> Optional[str]:
    if len(data) < 18:
        return "truncated BMP (no complete header)"
    offset = struct.unpack("<I", data[10:14])[0]
    header = struct.unpack("<I", data[14:18])[0]
    if len(data) < 14 + max(header, 12):
        return "truncated BMP (no complete header)"
    if header < 40:  # OS/2 core header: Pillow's own checks decide
        return None
    width, height, _planes, bpp, compression, size_image = struct.unpack("<iiHHII", data[18:38])
    if compression in (0, 3, 6):  # BI_RGB, BI_BITFIELDS, BI_ALPHABITFIELDS
        need = offset + ((abs(width) * bpp + 31) // 32) * 4 * abs(height)
    else:
        need = offset + size_image
    if need > len(data):
        return f"truncated BMP ({need - len(data)} bytes of pixel data missing)"
    return None
