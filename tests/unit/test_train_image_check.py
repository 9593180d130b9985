"""image_check: a truncated image is caught from its bytes, at every cut, whatever Pillow's process-wide
LOAD_TRUNCATED_IMAGES says, and whole images pass."""
import io
import random

import pytest
from PIL import Image, ImageFile

from lib_tune.train.dataset import BadImage, load_image
from lib_tune.train.image_check import incomplete, incomplete_bytes


def _noise(size=(24, 20), seed=0):
    rng = random.Random(seed)
    im = Image.new("RGB", size)
    im.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(size[0] * size[1])])
    return im


def _encode(fmt, **kw):
    buf = io.BytesIO()
    _noise().save(buf, format=fmt, **kw)
    return buf.getvalue()


FORMATS = {"PNG": {}, "JPEG": {"quality": 90}, "JPEG-progressive": {"quality": 90, "progressive": True},
           "WEBP": {"quality": 80}, "BMP": {}}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_cut_is_caught_and_the_whole_file_passes(fmt):
    data = _encode(fmt.split("-")[0], **FORMATS[fmt])
    assert incomplete_bytes(data) is None
    missed = [n for n in range(len(data)) if incomplete_bytes(data[:n]) is None]
    assert missed == [], f"{fmt}: cuts not caught at {missed[:10]} of {len(data)} bytes"


def test_png_crc_damage_is_caught():
    data = bytearray(_encode("PNG"))
    data[40] ^= 0xFF  # inside IHDR/IDAT
    assert "CRC" in incomplete_bytes(bytes(data))


def test_load_image_refuses_a_truncated_file_even_with_the_global_switch_on(tmp_path):
    p = tmp_path / "t.jpg"
    data = _encode("JPEG", quality=90)
    p.write_bytes(data[: len(data) * 2 // 3])
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # as BLIP and other extensions leave it in a webui
    try:
        with pytest.raises(BadImage, match="truncated JPEG"):
            load_image(str(p))
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # not touched
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old
    p.write_bytes(data)
    assert load_image(str(p)).size == (24, 20) and incomplete(str(p)) is None
