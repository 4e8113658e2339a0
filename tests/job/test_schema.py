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
     "loras[0].weight_name: a file inside the source's folder or snapshot, named by a relative path, not an "
     "absolute one; got '/etc/passwd'"),
    ({**BASE, "loras": ["a/b"]}, "loras[0]: must be an object with the keys source, scale, weight_name, e.g. "
     '{"source": "owner/name", "scale": 0.8}; got \'a/b\''),
    ({**BASE, "r2": "my-bucket"}, "r2: must be an object with the keys endpoint_url, access_key_id, secret_access_key, "
     'bucket_name, region, e.g. {"endpoint_url": "https://...", "access_key_id": "...", "secret_access_key": "...", '
     '"bucket_name": "..."}'),
    ({"operation": "decompose", "image_base64": "aGVsbG8=", "edits": [3]}, "edits[0]: must be an object with the "
     "keys layer, prompt,"),
    ({"operation": "decompose", "image_base64": "aGVsbG8=", "split": [None]}, "split[0]: must be an object with the "
     'keys layer, layers, prompt, e.g. {"layer": 1, "layers": 3}; got None'),
    ({"operation": "decompose", "image_base64": "aGVsbG8=", "split": "x"}, "split: must be a list of objects, one per "
     "layer to decompose again"),
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


LORA_PRESIGNED = "https://bucket.example/style.safetensors?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=5ec7e7"


@pytest.mark.parametrize("lora, expected", [
    ({"source": "a" * 300}, "loras[0].source: a file or folder name of 300 bytes; a name holds at most 255"),
    ({"source": "/vol/" + "é" * 200 + ".safetensors"}, "loras[0].source: a file or folder name of 412 bytes"),
    ({"source": "/" + "/".join(["d" * 200] * 11)}, "loras[0].source: string should have at most 2048 characters"),
    ({"source": "/" + "/".join(["語" * 80] * 17)}, "loras[0].source: a path of 4097 bytes; a path holds at most 4095"),
    ({"source": "owner/" + "n" * 100}, "loras[0].source: 'owner/nnnnnnnnnn"),
    ({"source": "own--er/name"}, "reads as a Hugging Face repo id (owner/name) and is not a valid one ('--' and '..' "
                                 "are not allowed); name a file on the volume by its absolute path"),
    ({"source": "owner./name"}, "owner and name cannot start or end with '-' or '.'"),
    ({"source": "owner/.."}, "'--' and '..' are not allowed"),
    ({"source": "/vol/a\x00b.safetensors"}, "loras[0].source: control character '\\x00' at position 6; a path or URL "
                                            "holds none"),
    ({"source": "https://host/a\nb"}, "loras[0].source: control character '\\n' at position 14"),
    ({"source": "ftp://user:password@host/x"}, "loras[0].source: unsupported scheme 'ftp': a source is an https://, "
                                               "http:// or s3:// URL (the scheme in lower case)"),
    ({"source": "HTTPS://host/x.safetensors"}, "loras[0].source: unsupported scheme 'HTTPS'"),
    ({"source": "file:///etc/passwd"}, "loras[0].source: unsupported scheme 'file'"),
    ({"source": "https:///x.safetensors"}, "loras[0].source: 'https:///x.safetensors' has no host"),
    ({"source": "http://[::1/x.safetensors"}, "loras[0].source: 'http://[::1/x.safetensors' is not a URL whose host "
                                              "and port can be read"),
    ({"source": "https://host:99999/x"}, "is not a URL whose host and port can be read"),
    ({"source": "s3://bucket"}, "loras[0].source: 's3://bucket' names no object; give s3://bucket/key"),
    ({"source": "s3://bad bucket/k"}, "loras[0].source: 's3://bad bucket/k': the bucket name is 1 to 255 letters"),
    ({"source": "s3://bucket/" + "k" * 1100}, "loras[0].source: an object key of 1100 bytes; S3 keys hold at most 1024"),
    ({"source": "owner/name", "weight_name": "../../../etc/hostname"},
     "loras[0].weight_name: a file inside the source's folder or snapshot: no '..', '.' or empty parts; "
     "got '../../../etc/hostname'"),
    ({"source": "owner/name", "weight_name": "sub/../../x.safetensors"}, "no '..', '.' or empty parts"),
    ({"source": "owner/name", "weight_name": "/etc/hostname"},
     "loras[0].weight_name: a file inside the source's folder or snapshot, named by a relative path, not an absolute"),
    ({"source": "owner/name", "weight_name": "a\\b.safetensors"}, "loras[0].weight_name: separate folders with '/'"),
    ({"source": "owner/name", "weight_name": "a\x00.safetensors"}, "loras[0].weight_name: control character '\\x00'"),
    ({"source": "owner/name", "weight_name": "x" * 256}, "loras[0].weight_name: a file or folder name of 256 bytes"),
    ({"source": "owner/name", "weight_name": "x" * 257}, "loras[0].weight_name: string should have at most 256"),
    ({"source": "owner/name", "weight_name": "a/" * 150 + "x"}, "loras[0].weight_name: string should have at most 256"),
])
def test_malformed_lora_sources_are_refused_with_a_short_error(lora, expected):
    error = error_for({**BASE, "loras": [lora]})
    assert error.startswith(expected) or (expected in error and error.startswith("loras[0]")), error
    assert len(error) <= 300 and error.isprintable()


@pytest.mark.parametrize("lora", [
    {"source": "/runpod-volume/loras/style v2.safetensors"},
    {"source": "loras/styles/ink.safetensors"},
    {"source": "lightx2v/Qwen-Image-Edit-2511-Lightning", "weight_name": "sub/folder/file.safetensors"},
    {"source": "https://host.example:8443/a/b.safetensors?X-Amz-Signature=abc"},
    {"source": "http://[::1]:8000/x.safetensors"},
    {"source": "s3://my-bucket/loras/ünï code.safetensors"},
])
def test_well_formed_lora_sources_are_accepted(lora):
    assert parse_request({**BASE, "loras": [lora]}).loras[0].source == lora["source"]


@pytest.mark.parametrize("loras, key", [
    ({"source": LORA_PRESIGNED}, "loras"),
    (LORA_PRESIGNED, "loras"),
    ([LORA_PRESIGNED], "loras[0]"),
    ({LORA_PRESIGNED: 0.8}, "loras"),
    ([{"source": "owner/name", "scale": LORA_PRESIGNED}], "loras[0].scale"),
    ([{"source": "owner/name", "weight_name": 5, "note": LORA_PRESIGNED}], "loras[0].weight_name"),
    ([{"source": LORA_PRESIGNED.replace("https", "hTTps")}], "loras[0].source"),
    ([{"source": LORA_PRESIGNED.replace("https://", "https:/")}], "loras[0].source"),
])
def test_a_lora_entry_of_any_shape_never_echoes_a_url_secret(loras, key):
    """A presigned URL where the schema does not expect one is echoed, when it is, without
    its query string (the credential and the signature)."""
    error = error_for({**BASE, "loras": loras})
    assert error.startswith(f"{key}: "), error
    assert "5ec7e7" not in error and "AKIAEXAMPLE" not in error and "X-Amz" not in error, error


def test_an_unknown_key_that_is_a_presigned_url_is_named_without_its_query():
    error = error_for({**BASE, LORA_PRESIGNED: 1})
    assert error.startswith("'https://bucket.example/style.safetensors': unknown key"), error
