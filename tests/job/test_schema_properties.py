"""Properties of the input schema over arbitrary JSON-like input (hypothesis): the parse
either returns a JobRequest or raises InputError whose text names a key and stays short
and printable; nothing else ever escapes. And every value inside the documented bounds
is accepted."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from src.job.redaction import redact
from src.job.schema import (MAX_ECHO_CHARS, MAX_ERROR_CHARS, MAX_PROMPT_CHARS, SEED_LIMIT, SIZE_MAX, SIZE_MIN,
                            BucketOverride, InputError, JobRequest, LayerEdit, LoraRequest, parse_request)

FIELDS = sorted(JobRequest.model_fields)
NESTED_FIELDS = sorted({*BucketOverride.model_fields, *LoraRequest.model_fields, *LayerEdit.model_fields})
# Values the schema's literals and bounds are made of, so inputs get past the type checks
# and reach the range and cross-key rules.
SCHEMA_WORDS = ["edit", "edit_multi", "decompose", "composite", "png", "jpeg", "webp", "zip", "psd", "ora",
                "https://bucket.example", "QUFB", "make it blue", " ",
                "https://user:pw@bucket.example/k?X-Amz-Signature=abc", "s3://bucket/k", "owner/name", "../x"]
SCHEMA_NUMBERS = [0, 1, 2, 4, 8, 10, 16, 32, 100, 101, 255, 256, 640, 1024, 2048, 2049, SEED_LIMIT - 1, SEED_LIMIT]
# Integers Python refuses to write out (over 4300 digits; built by a map, since hypothesis
# would repr them in the strategy's own description), and floats JSON has no word for.
huge_integers = st.integers(4300, 6000).map(lambda digits: 10**digits) | st.integers(4300, 6000).map(
    lambda digits: -(10**digits))
EXTREMES = [float("nan"), float("inf"), float("-inf")]

scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats() | st.text(max_size=30) | st.sampled_from(SCHEMA_WORDS) | st.sampled_from(SCHEMA_NUMBERS)
           | st.sampled_from(EXTREMES) | huge_integers)
keys = st.sampled_from(FIELDS) | st.sampled_from(NESTED_FIELDS) | st.text(max_size=12)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5), max_leaves=25)
objects = st.dictionaries(keys, json_values, max_size=10)
# Mostly near-valid: a minimal edit with some keys replaced.
near_valid = objects.map(lambda changes: {"image_base64": "QUFB", "prompt": "make it blue", **changes})
job_inputs = near_valid | objects | json_values

PROPERTY_SETTINGS = settings(max_examples=600, deadline=2000, database=None,
                             suppress_health_check=[HealthCheck.too_slow])


def names_a_key(error: str, job_input) -> bool:
    """The text starts with a field of the schema, `input`, or one of the input's own
    keys (an unknown key: as sent, or its repr, URL secrets taken out, cut to MAX_ECHO_CHARS
    characters)."""
    roots = [*FIELDS, "input"]
    if any(error.startswith(root) and error[len(root)] in ":.[" for root in roots):
        return True
    head = error.split(": unknown key;", 1)[0]
    return isinstance(job_input, dict) and any(
        head == key or head.startswith(repr(redact(key)[:MAX_ECHO_CHARS]))
        for key in job_input if isinstance(key, str))


@PROPERTY_SETTINGS
@given(job_inputs)
def test_any_input_parses_or_fails_naming_a_key(job_input):
    try:
        request = parse_request(job_input)
    except InputError as exc:
        error = str(exc)
        assert len(error) <= MAX_ERROR_CHARS and error.isprintable(), error
        assert names_a_key(error, job_input), error
        assert redact(error) == error, error  # no URL's user info, query or fragment in it
    else:
        assert isinstance(request, JobRequest)


prompts = st.text(st.characters(blacklist_categories=("Cc", "Cs")) | st.sampled_from("\t\n\r"), min_size=1,
                  max_size=MAX_PROMPT_CHARS).filter(str.strip)


@PROPERTY_SETTINGS
@given(prompt=prompts, negative_prompt=prompts, steps=st.integers(1, 100), cfg=st.floats(1.0, 20.0),
       seed=st.none() | st.integers(0, SEED_LIMIT - 1), width=st.integers(SIZE_MIN, SIZE_MAX),
       height=st.integers(SIZE_MIN, SIZE_MAX), quality=st.integers(1, 100), fmt=st.sampled_from(["png", "jpeg", "webp"]))
def test_every_edit_inside_the_documented_bounds_is_accepted(prompt, negative_prompt, steps, cfg, seed, width,
                                                            height, quality, fmt):
    request = parse_request({"operation": "edit", "image_base64": "QUFB", "prompt": prompt,
                             "negative_prompt": negative_prompt, "num_inference_steps": steps, "true_cfg_scale": cfg,
                             "seed": seed, "width": width, "height": height, "output_format": fmt,
                             "output_quality": quality})
    assert request.steps == steps and request.prompt == prompt
    out_width, out_height = request.output_size()
    assert SIZE_MIN <= out_width <= width and out_width % 16 == 0
    assert SIZE_MIN <= out_height <= height and out_height % 16 == 0
