"""The job schema: defaults, limits and the `<key>: <reason>` error texts."""

import pytest

from src.job.schema import InputError, parse_request

BASE = {"image_base64": "aGVsbG8=", "prompt": "make it blue"}


def error_for(job_input) -> str:
    with pytest.raises(InputError) as caught:
        parse_request(job_input)
    return str(caught.value)


def test_defaults():
    request = parse_request(BASE)
    assert request.operation == "edit"
    assert (request.steps, request.true_cfg_scale, request.guidance_scale) == (40, 4.0, 1.0)
    assert request.negative_prompt == " "
    assert request.seed is None
    assert request.output_size() == (None, None)
    assert request.output_format == "png" and request.output_quality == 95


def test_decompose_defaults_to_50_steps_and_needs_no_prompt():
    request = parse_request({"operation": "decompose", "image_base64": "aGVsbG8="})
    assert (request.steps, request.layers, request.resolution, request.prompt) == (50, 4, 640, "")


def test_sizes_round_down_to_a_multiple_of_16():
    assert parse_request({**BASE, "width": 1000, "height": 257}).output_size() == (992, 256)


def test_legacy_payload_gets_base64_unless_it_says_no():
    legacy = {**BASE, "num_inference_steps": 8, "seed": None, "guidance_scale": 1.0, "negative_prompt": " ",
              "images_base64": [], "use_fp8": False}
    assert parse_request(legacy).wants_base64 is True
    assert parse_request({**legacy, "return_base64": False}).wants_base64 is False
    assert parse_request({**BASE, "operation": "edit"}).wants_base64 is False


@pytest.mark.parametrize("job_input, expected", [
    ({"prompt": "x"}, "image_base64: required"),
    ({"image_base64": "aGVsbG8="}, "prompt: required and non-empty for edit"),
    ({**BASE, "prompt": "   "}, "prompt: required and non-empty for edit"),
    ({**BASE, "prompt": "x" * 2001}, "prompt: string should have at most 2000 characters"),
    ({**BASE, "operation": "inpaint"}, "operation: input should be 'edit', 'edit_multi', 'decompose' or 'composite'; got 'inpaint'"),
    ({**BASE, "operation": "edit_multi"}, "images_base64: edit_multi needs 2 or 3 images in all"),
    ({**BASE, "images_base64": ["a", "b", "c"]}, "images_base64: 3 extra images, 4 in all counting image_base64; "
     "at most 3 images in all (image_base64 plus up to 2 here)"),
    ({**BASE, "num_inference_steps": 0}, "num_inference_steps: input should be greater than or equal to 1; got 0"),
    ({**BASE, "num_inference_steps": 101}, "num_inference_steps: input should be less than or equal to 100; got 101"),
    ({**BASE, "num_inference_steps": "8"},
     "num_inference_steps: input should be a valid integer; got '8' (send a JSON number, not a string)"),
    ({**BASE, "num_inference_steps": True}, "num_inference_steps: input should be a valid integer; got True"),
    ({**BASE, "true_cfg_scale": 25.0}, "true_cfg_scale: input should be less than or equal to 20"),
    ({**BASE, "true_cfg_scale": float("inf")}, "true_cfg_scale: input should be a finite number"),
    ({**BASE, "seed": -1}, "seed: input should be greater than or equal to 0; got -1"),
    ({**BASE, "seed": 2**32}, "seed: input should be less than 4294967296"),
    ({**BASE, "width": 4096}, "width: input should be less than or equal to 2048; got 4096"),
    ({**BASE, "height": 100}, "height: input should be greater than or equal to 256; got 100"),
    ({**BASE, "output_format": "gif"}, "output_format: input should be 'png', 'jpeg' or 'webp'; got 'gif'"),
    ({**BASE, "layers": 3}, "layers: only used by decompose"),
    ({"operation": "decompose", "image_base64": "aGVsbG8=", "layers": 11}, "layers: input should be less than or equal to 10"),
    ({"operation": "decompose", "image_base64": "aGVsbG8=", "resolution": 800}, "resolution: input should be 640 or 1024; got 800"),
    ({"operation": "decompose", "image_base64": "aGVsbG8=", "output_format": "jpeg"}, "output_format: 'jpeg' cannot hold the layers' alpha"),
    ({"operation": "decompose", "image_base64": "aGVsbG8=", "width": 512}, "width: not used by decompose"),
    ({**BASE, "strength": 0.5}, "strength: unknown key; allowed keys: operation, image_base64"),
    ({**BASE, "r2": {"endpoint_url": "https://x", "access_key_id": "k", "secret_access_key": "s"}}, "r2.bucket_name: required"),
    ({**BASE, "r2": {"endpoint_url": "ftp://x", "access_key_id": "k", "secret_access_key": "s", "bucket_name": "b"}}, "r2.endpoint_url: must start with http:// or https://"),
    ("not an object", "input: must be a JSON object, got str"),
    (None, "input: must be a JSON object, got NoneType"),
])
def test_errors_name_the_key_the_value_and_what_is_allowed(job_input, expected):
    assert error_for(job_input).startswith(expected)


@pytest.mark.parametrize("job_input, expected", [
    ({"operation": "composite", "layers_base64": ["aGVsbG8="] * 17}, "layers_base64: 17 layers; at most 16 in one "
     "composite job"),
    ({"operation": "decompose", "image_base64": "aGVsbG8=", "edits": [{"layer": 0, "prompt": "x"}] * 11},
     "edits: 11 edits; at most 10 (one per layer)"),
    ({**BASE, "true_cfg_scale": "4"}, "true_cfg_scale: input should be a valid number; got '4' (send a JSON number, "
     "not a string)"),
    ({**BASE, "return_base64": "true"}, "return_base64: input should be a valid boolean; got 'true' (send JSON true "
     "or false, not a string)"),
    ({**BASE, "loras": [{"source": "a/b", "weight_name": "/etc/passwd"}]},
     "loras[0].weight_name: a file name inside the source, as in the repo or folder: no leading '/' and no '\\'; "
     "got '/etc/passwd'"),
    ({**BASE, "loras": ["a/b"]}, "loras[0]: must be an object with the keys source, scale, weight_name, e.g. "
     '{"source": "owner/name", "scale": 0.8}; got \'a/b\''),
    ({**BASE, "r2": "my-bucket"}, "r2: must be an object with the keys endpoint_url, access_key_id, secret_access_key, "
     'bucket_name, region, e.g. {"endpoint_url": "https://...", "access_key_id": "...", "secret_access_key": "...", '
     '"bucket_name": "..."}'),
    ({"operation": "decompose", "image_base64": "aGVsbG8=", "edits": [3]}, "edits[0]: must be an object with the "
     "keys layer, prompt,"),
    ({**BASE, "loras": "owner/name"}, 'loras: must be a list of objects, one per LoRA, e.g. [{"source": '
     '"owner/name", "scale": 0.8}]; got \'owner/name\''),
    ({**BASE, "images_base64": "aGVsbG8="}, "images_base64: must be a list of base64 strings, one per extra image, "
     "even for one"),
])
def test_pydantic_s_own_words_are_replaced_by_ones_that_say_the_fix(job_input, expected):
    """Limits counted as the user counts them, patterns in words, strict types with how to send them."""
    text = error_for(job_input)
    assert text.startswith(expected)
    assert not any(words in text for words in ("after validation", "pattern", "instance of", "valid list"))


def test_payloads_and_secrets_never_appear_in_errors():
    payload = "QUFB" * 1000
    assert payload not in error_for({**BASE, "image_base64": 12345, "images_base64": [payload, payload, payload]})
    assert payload[:20] not in error_for({**BASE, "images_base64": [payload, 7]})
    secret = "super-secret-r2-key"
    message = error_for({**BASE, "r2": {"endpoint_url": "https://x", "access_key_id": "k",
                                         "secret_access_key": secret, "bucket_name": 5}})
    assert message.startswith("r2.bucket_name") and secret not in message


def test_a_text_cut_short_is_exactly_the_limit():
    from src.job.schema import MAX_ERROR_CHARS, _bounded

    assert len(_bounded("x" * 5000)) == MAX_ERROR_CHARS and _bounded("x" * 5000).endswith("... (cut short)")
    assert _bounded("x" * MAX_ERROR_CHARS) == "x" * MAX_ERROR_CHARS
