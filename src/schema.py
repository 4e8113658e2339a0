"""The job input schema: one table of keys, types, defaults and limits.

`parse_request(job_input)` turns `job["input"]` into a typed `JobRequest` or raises
`InputError("<key>: <reason>")`. Nothing here touches images or the GPU; image bytes
are checked by `src.codec` right after.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

MAX_PROMPT_CHARS = 2000
MAX_EXTRA_IMAGES = 2  # 3 images in all
SIZE_MIN, SIZE_MAX = 256, 2048
SEED_LIMIT = 2**32
DEFAULT_STEPS = {"edit": 40, "edit_multi": 40, "decompose": 50}
ALPHA_FORMATS = ("png", "webp")
# Keys whose values are image payloads: their values never go into an error text.
PAYLOAD_KEYS = ("image_base64", "images_base64")

Operation = Literal["edit", "edit_multi", "decompose"]


class InputError(ValueError):
    """Bad job input. The message is `<key>: <reason>` and never carries a payload."""


class BucketOverride(BaseModel):
    """A job's own bucket (the `r2` key), used instead of the worker's BUCKET_* settings."""

    model_config = ConfigDict(extra="forbid", strict=True)

    endpoint_url: str = Field(min_length=1, pattern=r"^https?://")
    access_key_id: str = Field(min_length=1)
    secret_access_key: SecretStr
    bucket_name: str = Field(min_length=1)
    region: str | None = None


class LoraRequest(BaseModel):
    """One custom LoRA: a path on the volume, a repo id in the HF cache, or an https/s3 URL."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    source: str = Field(min_length=1, max_length=2048)
    scale: float = Field(1.0, ge=-4.0, le=4.0)
    weight_name: str | None = Field(None, min_length=1, max_length=256, pattern=r"^[^/\\][^\\]*$")


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    operation: Operation = Field("edit", description="edit, edit_multi or decompose")
    image_base64: str = Field(description="raw base64 or data URI; PNG, JPEG or WEBP")
    images_base64: list[str] = Field(default_factory=list, max_length=MAX_EXTRA_IMAGES,
                                     description="extra images for edit and edit_multi")
    prompt: str = Field("", max_length=MAX_PROMPT_CHARS,
                        description="the instruction; optional for decompose (empty: the model captions the image)")
    negative_prompt: str = Field(" ", max_length=MAX_PROMPT_CHARS)
    num_inference_steps: int | None = Field(None, ge=1, le=100, description="default 40; decompose 50")
    true_cfg_scale: float = Field(4.0, ge=1.0, le=20.0)
    guidance_scale: float = Field(1.0, description="passed through to the pipeline")
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT, description="null: a random one")
    width: int | None = Field(None, ge=SIZE_MIN, le=SIZE_MAX, description="rounded down to a multiple of 16")
    height: int | None = Field(None, ge=SIZE_MIN, le=SIZE_MAX, description="rounded down to a multiple of 16")
    layers: int = Field(4, ge=2, le=10, description="decompose only")
    resolution: Literal[640, 1024] = Field(640, description="decompose only")
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_quality: int = Field(95, ge=1, le=100, description="jpeg and webp")
    return_base64: bool | None = Field(None, description="also return base64; forced without a bucket")
    r2: BucketOverride | None = None
    lightning: Literal[4, 8] | None = Field(None, description="edits: the 4- or 8-step Lightning LoRA")
    loras: list[LoraRequest] = Field(default_factory=list, description="edits: custom LoRAs")
    snap: Literal[16, 32] = Field(16, description="width/height multiple; 32 matches ai-toolkit previews")
    use_fp8: bool | None = Field(None, description="accepted for compatibility")
    auto_resize: bool | None = Field(None, description="false: keep the input's size")

    @model_validator(mode="after")
    def _check_operation_rules(self) -> "JobRequest":
        if self.operation in ("edit", "edit_multi") and not self.prompt.strip():
            raise _rule("prompt", f"required and non-empty for {self.operation}")
        if self.operation == "edit_multi" and not self.images_base64:
            raise _rule("images_base64", "edit_multi needs 2 or 3 images in all: image_base64 plus "
                        "1 or 2 in images_base64; got 1 image")
        if self.operation == "decompose":
            for key in ("images_base64", "width", "height", "auto_resize", "lightning", "loras", "snap"):
                if key in self.model_fields_set and getattr(self, key):
                    raise _rule(key, "not used by decompose (its size comes from resolution: 640 or 1024)")
            if self.output_format not in ALPHA_FORMATS:
                raise _rule("output_format", f"{self.output_format!r} cannot hold the layers' alpha; "
                            f"decompose allows {' or '.join(ALPHA_FORMATS)}")
        else:
            for key in ("layers", "resolution"):
                if key in self.model_fields_set:
                    raise _rule(key, "only used by decompose")
        if self.lightning is not None:
            steps = self.num_inference_steps
            if steps is not None and steps != self.lightning:
                raise _rule("num_inference_steps", f"lightning {self.lightning} runs {self.lightning} steps; "
                            f"got {steps} (leave it out)")
            if "true_cfg_scale" in self.model_fields_set and self.true_cfg_scale != 1.0:
                raise _rule("true_cfg_scale", f"lightning runs without true CFG (1.0); got {self.true_cfg_scale}")
        return self

    # --- derived values -------------------------------------------------
    @property
    def steps(self) -> int:
        return self.num_inference_steps or self.lightning or DEFAULT_STEPS[self.operation]

    @property
    def cfg_scale(self) -> float:
        """true_cfg_scale as run: Lightning's distilled steps run without true CFG."""
        return 1.0 if self.lightning else self.true_cfg_scale

    @property
    def images(self) -> list[str]:
        return [self.image_base64, *self.images_base64]

    @property
    def legacy_shape(self) -> bool:
        """Requests without `operation` come from existing orchestrators that read only
        `edited_image_base64`: they get it unless they set return_base64 to false."""
        return "operation" not in self.model_fields_set

    @property
    def wants_base64(self) -> bool:
        if self.return_base64 is None:
            return self.legacy_shape
        return self.return_base64

    def output_size(self) -> tuple[int | None, int | None]:
        """Requested (width, height), each rounded down to a multiple of `snap`, or None."""
        round_down = lambda v: None if v is None else v // self.snap * self.snap  # noqa: E731
        return round_down(self.width), round_down(self.height)


class _RuleError(ValueError):
    def __init__(self, key: str, reason: str):
        super().__init__(reason)
        self.key, self.reason = key, reason


def _rule(key: str, reason: str) -> _RuleError:
    return _RuleError(key, reason)


def parse_request(job_input: Any) -> JobRequest:
    """`job["input"]` to a JobRequest, or InputError naming the first bad key."""
    if not isinstance(job_input, dict):
        raise InputError(f"input: must be a JSON object, got {type(job_input).__name__}")
    try:
        return JobRequest.model_validate(job_input)
    except ValidationError as exc:
        raise InputError(_describe(exc.errors()[0])) from None


def _describe(error: dict) -> str:
    """One pydantic error as `<key>: <reason>`, with the value unless it is a payload."""
    ctx_error = (error.get("ctx") or {}).get("error")
    if isinstance(ctx_error, _RuleError):
        return f"{ctx_error.key}: {ctx_error.reason}"
    loc = ".".join(str(part) for part in error["loc"])
    key = str(error["loc"][0]) if error["loc"] else "input"
    if error["type"] == "extra_forbidden":
        allowed = {"r2": BucketOverride, "loras": LoraRequest}.get(key, JobRequest).model_fields if key != loc \
            else JobRequest.model_fields
        return f"{loc}: unknown key; allowed keys: {', '.join(allowed)}"
    if error["type"] == "missing":
        return f"{loc}: required"
    message = error["msg"][0].lower() + error["msg"][1:]
    if key in PAYLOAD_KEYS or "secret" in loc:
        return f"{loc}: {message}"
    return f"{loc}: {message}; got {_short_repr(error.get('input'))}"


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"
