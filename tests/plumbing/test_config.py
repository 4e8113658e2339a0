from pathlib import Path

import pytest

from src.plumbing.config import ConfigError, Settings


def test_defaults_from_an_empty_environment():
    settings = Settings.from_env({"HF_HOME": "/models"})
    assert settings.hf_home == Path("/models")
    assert settings.edit_model == "Qwen/Qwen-Image-Edit-2511"
    assert settings.layered_model == "Qwen/Qwen-Image-Layered"
    assert settings.preload == {"edit"}
    assert settings.bucket is None
    assert (settings.bucket_prefix, settings.presign_expiry_s) == ("qwen-edit", 7200)
    assert settings.max_image_bytes == 20 * 1024 * 1024
    assert settings.max_image_pixels == 4096 * 4096
    assert (settings.job_timeout_s, settings.upload_attempts, settings.upload_timeout_s) == (0, 4, 20.0)
    assert settings.max_layer_edits == 4
    assert (settings.compile, settings.attention_backend) == (False, "sdpa")  # stock diffusers: exact outputs


def test_log_level_and_parallel_are_settings_too():
    assert (Settings.from_env({}).log_level, Settings.from_env({}).parallel) == ("INFO", "off")
    settings = Settings.from_env({"LOG_LEVEL": " debug ", "PARALLEL": "AUTO"})
    assert (settings.log_level, settings.parallel) == ("DEBUG", "auto")
    assert Settings.from_env({"PARALLEL": "4"}).parallel == "4"


def test_fp8_keeps_sglangs_recipe_in_bf16_unless_told_otherwise():
    # At least what SGLang's validated Qwen-Image-Edit recipe keeps (docs/upstream-register.md, row 18).
    assert Settings.from_env({}).fp8_keep_bf16 == {"img_mod.1", "txt_mod.1", "img_mlp.net.2"}
    assert Settings.from_env({"FP8_KEEP_BF16": "none"}).fp8_keep_bf16 == set()
    chosen = Settings.from_env({"FP8_KEEP_BF16": "img_mod.1, txt_mod.1"}).fp8_keep_bf16
    assert chosen == {"img_mod.1", "txt_mod.1"}


def test_the_fp8_cache_is_read_from_hf_home_unless_told_otherwise():
    settings = Settings.from_env({"HF_HOME": "/models"})
    assert (settings.fp8_cache, settings.fp8_cache_dir) == (True, Path("/models/qwen-fp8"))
    settings = Settings.from_env({"HF_HOME": "/models", "FP8_CACHE": "off", "FP8_CACHE_DIR": "/workspace/fp8"})
    assert (settings.fp8_cache, settings.fp8_cache_dir) == (False, Path("/workspace/fp8"))


def test_bucket_from_runpod_names_keeps_the_secret_out_of_repr():
    settings = Settings.from_env({
        "BUCKET_ENDPOINT_URL": "https://acc.r2.cloudflarestorage.com", "BUCKET_ACCESS_KEY_ID": "key-id",
        "BUCKET_SECRET_ACCESS_KEY": "very-secret-value", "BUCKET_NAME": "results", "PRELOAD": "edit,layered",
    })
    assert settings.bucket.bucket_name == "results"
    assert settings.bucket.secret_access_key == "very-secret-value"
    assert "very-secret-value" not in repr(settings)
    assert settings.preload == {"edit", "layered"}


@pytest.mark.parametrize("env, message", [
    ({"PRESIGN_EXPIRY_S": "soon"}, "PRESIGN_EXPIRY_S: 'soon' is not an integer"),
    ({"PRESIGN_EXPIRY_S": "0"}, "PRESIGN_EXPIRY_S: 0 is out of range"),
    ({"GPU_PRICE_PER_HOUR": "nan"}, "GPU_PRICE_PER_HOUR: 'nan' is out of range"),
    ({"PRELOAD": "edit,video"}, "PRELOAD: video not allowed"),
    ({"DEVICE": "tpu"}, "DEVICE: 'tpu' is not allowed"),
    ({"WARMUP": "maybe"}, "WARMUP: 'maybe' is not a boolean"),
    ({"COMPILE": "fast"}, "COMPILE: 'fast' is not a boolean"),
    ({"ATTENTION_BACKEND": "xformers"}, "ATTENTION_BACKEND: 'xformers' is not allowed; allowed: sdpa, cudnn, flash"),
    ({"JOB_TIMEOUT_S": "90s"}, "JOB_TIMEOUT_S: '90s' is not an integer"),
    ({"JOB_TIMEOUT_S": "-1"}, "JOB_TIMEOUT_S: -1 is out of range; allowed: 0 to 86400"),
    ({"UPLOAD_ATTEMPTS": "0"}, "UPLOAD_ATTEMPTS: 0 is out of range; allowed: 1 to 10"),
    ({"UPLOAD_TIMEOUT_S": "inf"}, "UPLOAD_TIMEOUT_S: 'inf' is out of range; allowed: 0.1 to 300"),
    ({"FP8_KEEP_BF16": "img_mod.1,img_mod"}, "FP8_KEEP_BF16: img_mod not allowed; allowed: a comma list of img_mod.1"),
    ({"FP8_CACHE": "write"}, "FP8_CACHE: 'write' is not allowed; allowed: on, off"),
    ({"MAX_LAYER_EDITS": "11"}, "MAX_LAYER_EDITS: 11 is out of range; allowed: 0 to 10"),
    ({"BUCKET_NAME": "results"}, "BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY must be set too"),
    ({"BUCKET_ENDPOINT_URL": "http://x"}, "BUCKET_ENDPOINT_URL is set but"),
    ({"LOG_LEVEL": "verbose"}, "LOG_LEVEL: 'VERBOSE' is not allowed; allowed: DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ({"PARALLEL": "17"}, "PARALLEL: 17 is out of range; allowed: 1 to 16"),
])
def test_bad_values_fail_with_one_line_naming_the_variable(env, message):
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"HF_HOME": "/models", **env})
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_a_bad_secret_value_is_never_echoed():
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"BUCKET_SECRET_ACCESS_KEY": "hunter2-secret"})
    assert "hunter2-secret" not in str(caught.value)
