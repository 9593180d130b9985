"""SAI ModelSpec keys of a trained file against kohya's own rules (library/sai_model_spec.py, run from its
shipped source)."""
import logging
import re
from typing import Union

import pytest

from lib_tune.train.modelspec import modelspec_metadata
from tests.unit.test_train_kohya_metadata import KOHYA_TAR, exec_defs, source


@pytest.fixture(scope="module")
def kohya_spec():
    ns = {"logging": logging, "Union": Union}
    return exec_defs(source(KOHYA_TAR, "library/sai_model_spec.py"),
                     ["determine_architecture", "determine_implementation", "determine_resolution"], ns, assigns=True)


@pytest.mark.parametrize("base, v, adapter", [("sd1", False, "lora"), ("sd2", False, "lora"), ("sd2", True, "lora"),
                                              ("sdxl", False, "lora"), ("sd1", False, "textual-inversion"),
                                              ("sdxl", False, "textual-inversion")])
def test_modelspec_matches_kohya(kohya_spec, base, v, adapter):
    lora, ti = adapter == "lora", adapter == "textual-inversion"
    m = modelspec_metadata(base, "My LoRA", v_parameterization=v, adapter=adapter, timestamp=1700000000,
                           clip_skip=2, optional={"trigger_phrase": "sks", "author": None})
    sdxl, v2 = base == "sdxl", base == "sd2"
    assert m["modelspec.architecture"] == kohya_spec["determine_architecture"](v2, v, sdxl, lora, ti)
    assert m["modelspec.implementation"] == kohya_spec["determine_implementation"](lora, ti, sdxl)
    assert m["modelspec.resolution"] == kohya_spec["determine_resolution"](None, sdxl, None, v2, v)
    assert m["modelspec.sai_model_spec"] == kohya_spec["BASE_METADATA"]["modelspec.sai_model_spec"]
    assert m["modelspec.prediction_type"] == ("v" if v else "epsilon")
    assert m["modelspec.encoder_layer"] == "2" and m["modelspec.trigger_phrase"] == "sks"
    assert "modelspec.author" not in m and m["modelspec.title"] == "My LoRA"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", m["modelspec.date"])
    assert modelspec_metadata("sd1", "x", resolution=(768, 512))["modelspec.resolution"] == "768x512"
