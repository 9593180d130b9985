"""The Tune tab's form: its values become exactly the job JSON the API takes, presets fill the advanced fields,
and the UI-only conventions (dreambooth, 0 = unset) map onto real config fields."""
import json
import shlex

import pytest

from lib_tune.train.config import PRESET_VALUES, ConfigError, TrainConfig
from lib_tune.ui import form


def filled(**over):
    values = form.initial_values()
    values.update(dataset="/data/me", trigger="ohwx", output_name="me", steps=30.0)
    values.update(over)
    return values


def config_of(job):
    return TrainConfig.from_dict(form.dataset_check_body(job))


def test_every_field_is_a_config_field_or_a_job_extra():
    config_fields = set(TrainConfig.__dataclass_fields__)
    for f in form.FIELDS:
        assert f.key in config_fields or f.key in form.JOB_EXTRAS, f.key
    assert len(form.KEYS) == len(set(form.KEYS))


def test_initial_form_is_the_character_preset_and_a_valid_job():
    job = form.to_job(filled())
    cfg = config_of(job)
    assert job["method"] == "lora" and job["preset"] == "character" and job["steps"] == 30
    ref = TrainConfig.from_dict(dict(dataset="/data/me", method="lora", steps=30, output_name="me", trigger="ohwx"))
    for key in ("network_dim", "network_alpha", "unet_lr", "te_lr", "optimizer", "lr_scheduler", "warmup_ratio",
                "min_snr_gamma", "train_text_encoder", "keep_tokens", "targets", "resolution", "conv_dim"):
        assert getattr(cfg, key) == getattr(ref, key), key
    assert "overwrite" not in job and "sample_prompts" not in job


def test_gradio_floats_become_config_types():
    job = form.to_job(filled(network_dim=8.0, batch_size=2.0, seed=1.0, unet_lr=5e-3, network_alpha=4))
    assert job["network_dim"] == 8 and isinstance(job["network_dim"], int)
    assert job["batch_size"] == 2 and job["seed"] == 1 and isinstance(job["seed"], int)
    assert job["network_alpha"] == 4.0 and isinstance(job["network_alpha"], float)
    json.dumps(job)  # plain JSON
    config_of(job)


def test_zero_means_unset_for_resolution_conv_dim_and_min_snr():
    job = form.to_job(filled(resolution=0, conv_dim=0, min_snr_gamma=0))
    assert job["resolution"] is None and job["conv_dim"] is None and job["min_snr_gamma"] is None
    cfg = config_of(job)
    assert cfg.resolution is None and cfg.conv_dim is None and cfg.min_snr_gamma is None
    job = form.to_job(filled(resolution=64.0, min_snr_gamma=5))
    assert job["resolution"] == 64 and job["min_snr_gamma"] == 5.0


def test_sample_prompts_are_lines_and_extras_only_when_set():
    job = form.to_job(filled(sample_prompts="ohwx, a photo\n\n  ohwx at the beach  \n", sample_every=10.0,
                             overwrite=True))
    assert job["sample_prompts"] == ["ohwx, a photo", "ohwx at the beach"]
    assert job["sample_every"] == 10 and job["sample_steps"] == 20 and job["overwrite"] is True
    assert set(job) - set(form.dataset_check_body(job)) == {"sample_prompts", "sample_steps", "overwrite"}


def test_empty_optional_text_is_left_out_and_required_text_is_kept_for_the_config_to_judge():
    job = form.to_job(filled(trigger="  ", default_caption="", class_dir=""))
    assert "default_caption" not in job and "class_dir" not in job and job["trigger"] == ""
    with pytest.raises(ConfigError) as e:
        config_of(job)
    assert e.value.field == "trigger"


def test_bad_values_reach_the_config_and_are_named():
    with pytest.raises(ConfigError) as e:
        config_of(form.to_job(filled(network_dim=0)))
    assert e.value.field == "network_dim"
    with pytest.raises(ConfigError) as e:
        config_of(form.to_job(filled(conv_dim=4)))  # plain lora trains no convolutions
    assert e.value.field == "conv_dim"


@pytest.mark.parametrize("preset", sorted(PRESET_VALUES))
def test_preset_values_are_the_presets_and_defaults_elsewhere(preset):
    vals = form.preset_values(preset)
    assert set(vals) == set(form.PRESET_KEYS)
    for key, value in vals.items():
        expected = PRESET_VALUES[preset].get(key, TrainConfig.__dataclass_fields__[key].default)
        assert value == form.to_ui(key, expected), key
    assert "noise_offset" in vals and "flip_aug" in vals and "unet_lr" in vals


def test_switching_preset_back_clears_the_previous_presets_values():
    values = filled(**form.preset_values("style"))
    assert values["noise_offset"] == 0.05 and values["flip_aug"] is True and values["te_lr"] == 0.0
    values.update(form.preset_values("character"), preset="character")
    job = form.to_job(values)
    assert job["noise_offset"] == 0.0 and job["flip_aug"] is False and job["te_lr"] == 1e-4
    assert config_of(job).train_text_encoder is True


def test_ti_preset_leaves_min_snr_off_and_ti_job_names_file_by_trigger():
    vals = form.preset_values("ti")
    assert vals["min_snr_gamma"] == 0 and vals["train_text_encoder"] is False
    job = form.to_job(filled(method="ti", preset="ti", output_name="", trigger="ohwx", **vals))
    assert job["output_name"] == "ohwx" and job["min_snr_gamma"] is None
    cfg = config_of(job)
    assert cfg.method == "ti" and cfg.num_vectors == 4 and cfg.emb_lr == 5e-3


def test_method_picks_its_preset():
    assert form.preset_for_method("ti", "style") == "ti"
    assert form.preset_for_method("pivotal", "character") == "pivotal"
    assert form.preset_for_method("loha", "style") == "style"
    assert form.preset_for_method("lora", "ti") == "character"
    assert form.preset_for_method("dreambooth", "character") == "object"


def test_dreambooth_is_lora_with_a_prior():
    job = form.to_job(filled(method="dreambooth", prior="none"))
    assert job["method"] == "lora" and job["prior"] == "base_prediction"
    assert config_of(job).prior == "base_prediction"
    job = form.to_job(filled(method="dreambooth", prior="none", class_dir="/data/class", class_prompt="a dog"))
    assert job["prior"] == "class_images" and job["class_dir"] == "/data/class"
    assert config_of(job).class_prompt == "a dog"
    assert form.to_job(filled(method="dreambooth", prior="base_prediction"))["prior"] == "base_prediction"
    assert form.prior_for_method("lora", "none", "/x") == "none"


def test_api_request_is_the_job_as_json_and_a_working_curl_line():
    job = form.to_job(filled(trigger="it's", sample_prompts="it's a photo"))
    pretty, curl = form.api_request(job, "http://127.0.0.1:7860/")
    assert json.loads(pretty) == job
    argv = shlex.split(curl)
    assert argv[:4] == ["curl", "-X", "POST", "http://127.0.0.1:7860/tune/v1/train"]
    assert json.loads(argv[argv.index("-d") + 1]) == job
    assert "Content-Type: application/json" in argv


def test_resume_body_and_use_text():
    cfg = dict(dataset="/d", method="lora", steps=30, output_name="me", trigger="ohwx", overwrite=True,
               sample_prompts=["p"])
    body = form.resume_body(cfg)
    assert body["resume"] is True and "overwrite" not in body and body["sample_prompts"] == ["p"]
    assert form.use_text({"output_path": "/l/me.safetensors", "config": cfg}) == "ohwx, <tune:me:1>"
    assert form.use_text({"output_path": None, "config": cfg}) == ""
    ti = dict(cfg, method="ti", output_name="ohwx")
    assert form.use_text({"output_path": "/e/ohwx.safetensors", "config": ti}) == "ohwx"


def test_values_from_names_positional_values():
    assert form.values_from(("a", "b"), (1, 2)) == {"a": 1, "b": 2}
    with pytest.raises(ValueError):
        form.values_from(("a",), (1, 2))


def test_validation_fields_reach_the_job_with_config_types():
    job = form.to_job(filled())
    assert job["validation_count"] == 0 and job["validation_split"] == 0.0 and job["keep_best"] is True
    assert job["early_stopping_patience"] == 0 and job["validation_timesteps"] == 4
    assert config_of(job).validation_interval == 0
    job = form.to_job(filled(validation_count=3.0, validation_every=50.0, validation_timesteps=2.0,
                             early_stopping_patience=4.0, early_stopping_min_delta=0.001, keep_best=False))
    assert job["validation_count"] == 3 and isinstance(job["validation_count"], int)
    assert job["validation_every"] == 50 and job["early_stopping_patience"] == 4 and job["keep_best"] is False
    cfg = config_of(job)
    assert (cfg.validation_count, cfg.validation_interval, cfg.validation_timesteps) == (3, 50, 2)
    assert cfg.early_stopping_min_delta == 0.001 and cfg.keep_best is False
    with pytest.raises(ConfigError) as e:  # early stopping without a held-out set is named
        config_of(form.to_job(filled(early_stopping_patience=2.0)))
    assert e.value.field == "early_stopping_patience"


def test_stages_json_goes_into_the_job_and_malformed_json_is_named():
    plan = [{"targets": "mid_proj", "steps": 20, "network_dim": 8},
            {"targets": ["lora_te_*_layers_11_*"], "steps": 10, "te_lr": 5e-5, "name": "te"}]
    job = form.to_job(filled(stages=json.dumps(plan, indent=1)))
    assert job["stages"] == plan and "steps" not in job  # derived from the stages
    cfg = config_of(job)
    assert cfg.stages == plan and cfg.steps == 30
    assert "stages" not in form.to_job(filled(stages="   ")) and form.to_job(filled())["steps"] == 30
    with pytest.raises(ConfigError) as e:
        form.to_job(filled(stages='[{"targets": "mid_proj", "steps": 20,}]'))
    assert e.value.field == "stages" and "not valid JSON" in e.value.message and "column" in e.value.message
    with pytest.raises(ConfigError) as e:
        form.to_job(filled(stages='{"targets": "mid_proj", "steps": 20}'))
    assert e.value.field == "stages" and "list" in e.value.message
    with pytest.raises(ConfigError) as e:  # well-formed JSON, bad stage: the config names the stage field
        config_of(form.to_job(filled(stages='[{"targets": "mid_proj"}]')))
    assert e.value.field == "stages[0].steps"
