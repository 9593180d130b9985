"""kohya's key set of a trained file: the ss_* keys and their formatting, and the sshs hashes checked against
kohya's and the webui's own hash functions (run from their shipped sources)."""
import ast
import hashlib
import io
import json
import os
import re
import tarfile

import pytest
import safetensors
import safetensors.torch
import torch
from PIL import Image
from safetensors.torch import save_file

from lib_tune.formats.write import addnet_hash, legacy_hash, save_adapter
from lib_tune.train.buckets import BucketConfig, plan_buckets
from lib_tune.train.dataset import DatasetConfig, discover
from lib_tune.train.kohya_metadata import (RunInfo, add_hashes, base_model_version, build_ss_metadata,
                                           dataset_fields, metadata_for_save, minimum_metadata, network_args_for,
                                           network_module_for, precalculate_hashes)
from lib_tune.train.modelspec import modelspec_metadata

KOHYA_TAR = "/work/shared/kohya-src/sd-scripts.tar.gz"
WEBUI_TAR = "/work/shared/webui-src/webui.tar.gz"

BRIEF_KEYS = """ss_session_id ss_training_started_at ss_output_name ss_learning_rate ss_text_encoder_lr ss_unet_lr
ss_num_train_images ss_num_reg_images ss_num_batches_per_epoch ss_num_epochs ss_batch_size_per_device
ss_total_batch_size ss_gradient_accumulation_steps ss_max_train_steps ss_lr_warmup_steps ss_lr_scheduler
ss_network_module ss_network_dim ss_network_alpha ss_network_args ss_mixed_precision ss_full_fp16 ss_v2
ss_base_model_version ss_sd_model_name ss_sd_model_hash ss_new_sd_model_hash ss_resolution ss_clip_skip ss_seed
ss_noise_offset ss_min_snr_gamma ss_caption_dropout_rate ss_keep_tokens ss_shuffle_caption ss_tag_frequency
ss_dataset_dirs ss_bucket_info ss_training_comment ss_steps ss_epoch ss_optimizer ss_max_grad_norm""".split()


def source(tar, member):
    if not os.path.isfile(tar):
        pytest.skip(f"{tar} not available")
    with tarfile.open(tar) as tf:
        return tf.extractfile("./" + member).read().decode("utf-8")


def exec_defs(src, names, ns, assigns=False):
    """Run only the named top-level defs (and optionally the top-level assignments) of a reference source."""
    body = [n for n in ast.parse(src).body
            if getattr(n, "name", None) in names or (assigns and isinstance(n, ast.Assign))]
    exec(compile(ast.Module(body=body, type_ignores=[]), "<reference>", "exec"), ns)
    return ns


def tensors():
    g = torch.Generator().manual_seed(0)
    # > 1 MiB of payload so the legacy hash reads real data
    return {"lora_unet_x.lora_down.weight": torch.randn(8, 40000, generator=g),
            "lora_unet_x.lora_up.weight": torch.randn(320, 8, generator=g).half(),
            "lora_unet_x.alpha": torch.tensor(4.0)}


@pytest.fixture
def small_dataset(tmp_path):
    r = tmp_path / "train"
    (r / "10_sks dog").mkdir(parents=True)
    Image.new("RGB", (512, 512)).save(r / "10_sks dog" / "a.png")
    (r / "10_sks dog" / "a.txt").write_text("sks, Dog, grass")
    Image.new("RGB", (600, 800), "red").save(r / "10_sks dog" / "b.png")
    (r / "10_sks dog" / "b.txt").write_text("sks, dog, sofa")
    c = tmp_path / "reg"
    c.mkdir()
    Image.new("RGB", (512, 512), "blue").save(c / "k.png")
    ds = discover(DatasetConfig(train_dir=str(r), class_dir=str(c), class_caption="dog"))
    entries = ds.entries()
    cfg = BucketConfig()
    plan = plan_buckets([it.size for it, _ in entries], [n for _, n in entries], cfg)
    return ds, plan, cfg


def full_run(small_dataset, **kw):
    ds, plan, cfg = small_dataset
    args = dict(output_name="my_lora", base="sd1", session_id=1234, training_started_at=1700000000.5,
                sd_model_name="v1-5.safetensors", sd_model_hash="cc6cb27103", new_sd_model_hash="e1441589a6f3c5",
                vae_name="vae.pt", vae_hash="abcd1234", new_vae_hash="ff" * 32, clip_skip=2,
                network_dim=16, network_alpha=8, network_args=network_args_for("lora", conv_dim=8, conv_alpha=4),
                learning_rate=1e-4, unet_lr=1e-4, text_encoder_lr=5e-5, optimizer="torch.optim.adamw.AdamW",
                optimizer_args={"weight_decay": 0.01}, lr_scheduler="cosine", lr_warmup_steps=10,
                max_train_steps=100, num_epochs=5, num_batches_per_epoch=plan.batches_per_epoch(2), batch_size=2,
                mixed_precision="bf16", seed=42, noise_offset=0.05, min_snr_gamma=5.0, caption_dropout_rate=0.05,
                keep_tokens=1, shuffle_caption=True, training_comment="hello")
    args.update(kw)
    return RunInfo(**args, **dataset_fields(ds, plan, cfg))


def test_brief_keys_and_string_values(small_dataset):
    ss = build_ss_metadata(full_run(small_dataset))
    final = metadata_for_save(tensors(), ss, steps=100, epoch=5, finished_at=1700000100.0)
    missing = [k for k in BRIEF_KEYS if k not in final]
    assert missing == []
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in final.items())
    assert final["ss_steps"] == "100" and final["ss_epoch"] == "5"
    assert final["ss_v2"] == "False" and final["ss_base_model_version"] == "sd_v1"
    assert final["ss_resolution"] == "(512, 512)"
    assert final["ss_network_module"] == "networks.lora"
    assert json.loads(final["ss_network_args"]) == {"conv_dim": "8", "conv_alpha": "4"}
    assert final["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.01)"
    assert final["ss_network_alpha"] == "8.0" and final["ss_network_dim"] == "16"
    assert final["ss_learning_rate"] == "0.0001" and final["ss_text_encoder_lr"] == "5e-05"
    assert final["ss_total_batch_size"] == "2" and final["ss_batch_size_per_device"] == "2"
    assert final["ss_training_started_at"] == "1700000000.5"
    assert final["ss_noise_offset_random_strength"] == "False" and final["ss_vae_name"] == "vae.pt"
    assert final["ss_face_crop_aug_range"] == "None"  # kohya writes str(None)


def test_dataset_derived_keys(small_dataset):
    ds, plan, _ = small_dataset
    ss = build_ss_metadata(full_run(small_dataset))
    assert ss["ss_num_train_images"] == "20" and ss["ss_num_reg_images"] == "1"
    assert json.loads(ss["ss_tag_frequency"]) == {"10_sks dog": {"sks": 2, "dog": 2, "grass": 1, "sofa": 1},
                                                  "reg": {"dog": 1}}
    assert json.loads(ss["ss_dataset_dirs"]) == {"10_sks dog": {"n_repeats": 10, "img_count": 2}}
    assert json.loads(ss["ss_reg_dataset_dirs"]) == {"reg": {"n_repeats": 1, "img_count": 1}}
    info = json.loads(ss["ss_bucket_info"])
    # 20 training samples + 20 balanced class samples; keys are "0".. like kohya's json.dumps of int keys
    assert info["buckets"] == {"0": {"resolution": [448, 576], "count": 10},
                               "1": {"resolution": [512, 512], "count": 30}}
    assert info["mean_img_ar_error"] == pytest.approx(plan.mean_ar_error)
    assert ss["ss_enable_bucket"] == "True" and ss["ss_min_bucket_reso"] == "256"


def test_key_set_matches_kohya_train_network(small_dataset):
    src = source(KOHYA_TAR, "train_network.py")
    kohya_keys = set(re.findall(r'"(ss_[a-z0-9_]+)"', src))
    assert len(kohya_keys) > 60
    final = metadata_for_save(tensors(), build_ss_metadata(full_run(small_dataset)), steps=1, epoch=1)
    # ss_datasets: dataset-config mode only; ss_sd_scripts_commit_hash: names kohya's own git commit
    assert sorted(kohya_keys - set(final) - {"ss_datasets", "ss_sd_scripts_commit_hash"}) == []
    assert sorted(k for k in final if k.startswith("ss_") and k not in kohya_keys) == []


def test_optional_keys_absent_like_kohya(small_dataset):
    ss = build_ss_metadata(full_run(small_dataset, network_args=None, sd_model_name=None, vae_name=None))
    for k in ("ss_network_args", "ss_sd_model_name", "ss_sd_model_hash", "ss_vae_name", "ss_vae_hash"):
        assert k not in ss
    assert minimum_metadata(ss) == {k: ss[k] for k in ("ss_v2", "ss_base_model_version", "ss_network_module",
                                                        "ss_network_dim", "ss_network_alpha")}
    m = metadata_for_save(tensors(), ss, steps=3, epoch=1, minimal=True,
                          modelspec=modelspec_metadata("sd1", "t", timestamp=0))
    assert "ss_steps" not in m and "ss_tag_frequency" not in m and "modelspec.title" in m and "sshs_model_hash" in m


def test_versions_modules_and_args():
    assert base_model_version("sd1") == "sd_v1" and base_model_version("sd2") == "sd_v2"
    assert base_model_version("sd2", True) == "sd_v2_v" and base_model_version("sd1", True) == "sd_v1_v"
    assert base_model_version("sdxl") == "sdxl_base_v1-0"
    with pytest.raises(ValueError):
        base_model_version("flux")
    assert network_module_for("lora") == "networks.lora" and network_module_for("LoCon") == "networks.lora"
    for algo in ("loha", "lokr", "dora", "ia3"):
        assert network_module_for(algo) == "lycoris.kohya"
    assert network_args_for("loha", conv_dim=4, conv_alpha=2) == {"algo": "loha", "conv_dim": "4", "conv_alpha": "2"}
    assert network_args_for("dora", extra={"wd_on_output": False}) == {"algo": "lora", "dora_wd": "True",
                                                                       "wd_on_output": "False"}
    assert network_args_for("lora") == {}


def test_webui_classification(small_dataset):
    """What webui's Lora NetworkOnDisk.detect_version checks (extensions-builtin/Lora/network.py)."""
    xl = build_ss_metadata(full_run(small_dataset, base="sdxl"))
    assert xl["ss_base_model_version"].startswith("sdxl_") and xl["ss_v2"] == "False"
    sd2 = build_ss_metadata(full_run(small_dataset, base="sd2", v_parameterization=True))
    assert sd2["ss_v2"] == "True" and sd2["ss_base_model_version"] == "sd_v2_v"


def test_hashes_equal_webui_and_kohya(tmp_path, small_dataset):
    webui = exec_defs(source(WEBUI_TAR, "modules/hashes.py"), ["addnet_hash_safetensors"], {"hashlib": hashlib})
    kohya = exec_defs(source(KOHYA_TAR, "library/train_util.py"),
                      ["precalculate_safetensors_hashes", "addnet_hash_legacy", "addnet_hash_safetensors",
                       "model_hash"],
                      {"hashlib": hashlib, "safetensors": safetensors, "BytesIO": io.BytesIO})
    t = tensors()
    ss = build_ss_metadata(full_run(small_dataset))
    spec = modelspec_metadata("sd1", "my_lora", timestamp=1700000000)
    meta = metadata_for_save(t, ss, steps=10, epoch=1, modelspec=spec, finished_at=1700000001.0)
    path = str(tmp_path / "out.safetensors")
    save_file(t, path, meta)
    with open(path, "rb") as f:
        assert webui["addnet_hash_safetensors"](f) == meta["sshs_model_hash"]
    no_hashes = {k: v for k, v in meta.items() if not k.startswith("sshs_")}
    assert kohya["precalculate_safetensors_hashes"](t, no_hashes) == (meta["sshs_model_hash"],
                                                                      meta["sshs_legacy_hash"])
    assert meta["sshs_legacy_hash"] != hashlib.sha256(b"").hexdigest()[:8]  # real data at 1 MiB
    # legacy hash = the 64 KiB at 1 MiB of the file saved with only the ss_* keys
    ss_path = str(tmp_path / "ss_only.safetensors")
    save_file(t, ss_path, {k: v for k, v in no_hashes.items() if k.startswith("ss_")})
    assert legacy_hash(ss_path) == meta["sshs_legacy_hash"] == kohya["model_hash"](ss_path)
    # the project's own writer gives a file whose hash is the precomputed one
    ours = str(tmp_path / "ours.safetensors")
    save_adapter(ours, t, meta)
    assert addnet_hash(ours) == meta["sshs_model_hash"]
    # user edits of non-ss keys leave both hashes unchanged; an ss_ edit that shifts the payload moves only
    # the legacy hash (the header is padded to 8 bytes, so the value must grow by more than that)
    edited = dict(no_hashes, **{"modelspec.title": "renamed", "ssmd_author": "me"})
    assert precalculate_hashes(t, edited) == (meta["sshs_model_hash"], meta["sshs_legacy_hash"])
    mh, lh = precalculate_hashes(t, dict(no_hashes, ss_output_name="a much longer output name than before"))
    assert mh == meta["sshs_model_hash"] and lh != meta["sshs_legacy_hash"]
    # different tensors, different hash
    t2 = dict(t)
    t2["lora_unet_x.alpha"] = torch.tensor(8.0)
    assert add_hashes(t2, ss)["sshs_model_hash"] != meta["sshs_model_hash"]


def test_hash_of_non_contiguous_tensors_matches_saved_file(tmp_path):
    t = {"a.lora_down.weight": torch.arange(24.0).reshape(4, 6).t(), "a.alpha": torch.tensor(1.0)}
    assert not t["a.lora_down.weight"].is_contiguous()
    meta = add_hashes(t, {"ss_output_name": "x"})
    path = str(tmp_path / "nc.safetensors")
    save_adapter(path, t, meta)
    assert addnet_hash(path) == meta["sshs_model_hash"]
