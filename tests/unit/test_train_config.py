"""The job config: required fields, presets, and ConfigError naming the bad field (the API's 422)."""
import json

import pytest

from lib_tune.train.config import PRESET_VALUES, REQUIRED, ConfigError, TrainConfig

BASE = dict(dataset="/data/me", method="lora", steps=1000, output_name="me", trigger="ohwx")


def cfg(**over):
    return TrainConfig.from_dict(dict(BASE, **over))


def error_field(**over):
    with pytest.raises(ConfigError) as e:
        cfg(**over)
    return e.value.field


def test_only_the_five_fields_are_required():
    c = cfg()
    assert (c.dataset, c.method, c.steps, c.output_name, c.trigger) == ("/data/me", "lora", 1000, "me", "ohwx")
    for key in REQUIRED:
        data = dict(BASE)
        del data[key]
        with pytest.raises(ConfigError) as e:
            TrainConfig.from_dict(data)
        assert e.value.field == key and "required" in str(e.value)


def test_character_preset_is_the_default_for_networks():
    c = cfg()
    assert c.preset == "character"
    assert (c.network_dim, c.network_alpha, c.unet_lr, c.te_lr) == (16, 8.0, 5e-4, 1e-4)
    assert (c.optimizer, c.lr_scheduler, c.warmup_ratio, c.min_snr_gamma) == ("adamw", "cosine", 0.1, 5.0)
    assert c.warmup == 100 and c.train_text_encoder and c.targets == "attn_mlp"


def test_presets_by_method_and_by_name():
    ti = cfg(method="ti", output_name="ohwx")
    assert (ti.preset, ti.num_vectors, ti.emb_lr, ti.min_snr_gamma) == ("ti", 4, 5e-3, None)
    piv = cfg(method="pivotal")
    assert piv.preset == "pivotal" and piv.emb_lr == 5e-4 and piv.unet_lr == 5e-4
    style = cfg(preset="style")
    assert (style.network_dim, style.network_alpha, style.train_text_encoder, style.noise_offset) == \
        (32, 16.0, False, 0.05)
    obj = cfg(preset="object")
    assert (obj.unet_lr, obj.te_lr) == (1e-4, 5e-5)
    # explicit values win over the preset; JSON ints are fine for float fields
    c = cfg(network_dim=32, unet_lr=1, warmup_steps=7)
    assert c.network_dim == 32 and c.unet_lr == 1.0 and isinstance(c.unet_lr, float) and c.warmup == 7


def test_no_preset_ships_kohyas_raw_learning_rate():
    for values in PRESET_VALUES.values():
        for key in ("unet_lr", "te_lr", "emb_lr"):
            assert values.get(key, 1e-4) == 0 or values.get(key, 1e-4) >= 5e-5


@pytest.mark.parametrize("over, field", [
    (dict(method="dreamboat"), "method"),
    (dict(steps=-5), "steps"),
    (dict(steps="100"), "steps"),
    (dict(steps=True), "steps"),
    (dict(output_name="a/b"), "output_name"),
    (dict(output_name=".."), "output_name"),
    (dict(colour="red"), "colour"),
    (dict(preset="anime"), "preset"),
    (dict(targets="everything"), "targets"),
    (dict(network_dim=0), "network_dim"),
    (dict(network_alpha=0), "network_alpha"),
    (dict(unet_lr=-1e-4), "unet_lr"),
    (dict(unet_lr="fast"), "unet_lr"),
    (dict(optimizer="lion"), "optimizer"),
    (dict(lr_scheduler="step"), "lr_scheduler"),
    (dict(warmup_ratio=1.5), "warmup_ratio"),
    (dict(warmup_steps=5000), "warmup_steps"),
    (dict(batch_size=0), "batch_size"),
    (dict(mixed_precision="fp8"), "mixed_precision"),
    (dict(save_dtype="int8"), "save_dtype"),
    (dict(resolution=500), "resolution"),
    (dict(min_snr_gamma=0), "min_snr_gamma"),
    (dict(prior="class_images"), "class_dir"),
    (dict(prior="magic"), "prior"),
    (dict(conv_dim=8), "conv_dim"),  # plain LoRA does not train convolutions
    (dict(lokr_factor=0), "lokr_factor"),
    (dict(train_text_encoder="yes"), "train_text_encoder"),
    (dict(train_text_encoder=True, te_lr=0), "te_lr"),
    (dict(method="ti", output_name="other"), "output_name"),
    (dict(method="ti", trigger="two words", output_name="two words"), "trigger"),
    (dict(method="pivotal", trigger="a.b"), "trigger"),
    (dict(method="ti", output_name="ohwx", train_text_encoder=True), "train_text_encoder"),
    (dict(method="ti", output_name="ohwx", prior="base_prediction"), "prior"),
    (dict(preset="style", unet_lr=0), "unet_lr"),
    (dict(seed=-1), "seed"),
    (dict(keep_last=0), "keep_last"),
])
def test_errors_name_the_field(over, field):
    assert error_field(**over) == field


def test_body_must_be_an_object():
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict(["lora"])
    assert e.value.field == "body"


def test_round_trips_through_json():
    c = cfg(method="locon", targets="full", conv_dim=8, conv_alpha=4, class_dir="/cls", prior="class_images")
    again = TrainConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c


def test_dreambooth_is_lora_with_prior_preservation(tmp_path):
    from lib_tune.train.config import TrainConfig
    base = {"dataset": str(tmp_path), "method": "dreambooth", "steps": 30, "output_name": "x", "trigger": "x"}
    c = TrainConfig.from_dict(base)
    assert (c.method, c.prior, c.preset) == ("lora", "base_prediction", "object")
    c = TrainConfig.from_dict(dict(base, class_dir=str(tmp_path)))
    assert (c.method, c.prior) == ("lora", "class_images")
