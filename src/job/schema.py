"""The job input schema: one table of keys, types, defaults and limits.

`parse_request(job_input)` turns `job["input"]` into a typed `JobRequest` or raises
`InputError("<key>: <reason>")`. Nothing here touches images or the GPU; image bytes
are checked by `src.job.codec` right after.

List items are named with their index, as in `edits[1].layer` or `layers_base64[0]`.
"""

from __future__ import annotations

import re
import reprlib
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, SecretStr, TypeAdapter,
                      ValidationError, model_validator)
from pydantic_core import PydanticCustomError

from src.job.redaction import redact

MAX_PROMPT_CHARS = 2000
MAX_EXTRA_IMAGES = 2  # 3 images in all
MAX_IMAGES_PER_PROMPT = 4  # num_images
# The most prompts one job may list; MAX_PROMPTS (default 8) sets the worker's limit below it.
MAX_PROMPTS_LIMIT = 32
SIZE_MIN, SIZE_MAX = 256, 2048
SEED_LIMIT = 2**32
DEFAULT_STEPS = {"edit": 40, "edit_multi": 40, "decompose": 50}
ALPHA_FORMATS = ("png", "webp")
# What the edit model sees under an RGBA image's transparent pixels. One image: the flat
# green the Qwen-Image-Layered authors' RGBA edit tool (src/tool/edit_rgba_image.py) puts
# under a layer before the edit (RGB 30, 215, 96); several: white, as documented.
SINGLE_IMAGE_MATTE = "#1ed760"
MULTI_IMAGE_MATTE = "#ffffff"
MAX_LAYERS = 10  # the most layers one decomposition makes
# The most sub-layers one job's `split` makes in all: two full splits. Each split is a
# decomposition of its own run after the first, so this bounds the job to about three.
MAX_SUB_LAYERS = 20
# Layers sent to `composite`: each may be as large as MAX_IMAGE_PIXELS, and all are
# decoded at once, so the count bounds the job's memory (16 x 4096 x 4096 RGBA = 1 GiB).
MAX_COMPOSITE_LAYERS = 16
# Keys whose values are image payloads: their values never go into an error text.
PAYLOAD_KEYS = ("image_base64", "images_base64", "layers_base64")
# Keys whose values may carry credentials (a job's bucket; image and LoRA URLs with a
# presigned query string): their values never go into an error text either.
SECRET_KEYS = ("r2", "image_url", "image_urls")
SECRET_FIELDS = ("source",)
# An error text stays short whatever the input: values and unknown keys are cut to
# MAX_ECHO_CHARS, and the whole text to MAX_ERROR_CHARS.
MAX_ECHO_CHARS = 80
MAX_ERROR_CHARS = 600
# Control characters reach the tokenizer as junk tokens (NUL ends C strings in some
# logs and tools); prompts keep tab and line breaks, the only ones text needs.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# The longest side of an input image over its shortest that each operation's pipeline takes.
# edit, edit_multi: the pipeline resizes every input to about 384x384 pixels at multiples of
# 32 for Qwen2.5-VL, whose processor refuses a shape past 200:1 (smart_resize); inputs past
# 279:1 come out past it. decompose: the caption of an empty prompt goes through the same
# processor at the resolution's area, past it beyond 163:1 at 1024 (177:1 at 640); one limit
# for every decompose, so that a job's prompt or resolution never decides whether its image
# is taken. composite runs no model and takes any shape. (tests/job/test_image_shapes.py)
MAX_ASPECT_RATIO = {"edit": 279, "edit_multi": 279, "decompose": 163}
# A LoRA source: a URL, a Hugging Face repo id or a path on the volume. Bytes a path may hold
# (Linux's PATH_MAX and NAME_MAX); S3's longest object key; HF's longest repo id.
MAX_SOURCE_CHARS = 2048
MAX_PATH_BYTES, MAX_NAME_BYTES = 4095, 255
MAX_S3_KEY_BYTES = 1024
MAX_REPO_ID_CHARS = 96
MAX_WEIGHT_NAME_CHARS = 256  # a file in a source's folder or snapshot, subfolders included
# A source of this shape is a repo id in the HF cache (README, LoRAs), any other relative
# path a path under the first of LORA_ROOTS.
REPO_ID_SHAPE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+", re.ASCII)
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):/")
_S3_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
# No control character has a place in a source or a file name (NUL cannot be in a path at all).
_PATH_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# What `composite` reads: it stacks layers on the CPU and runs no model.
COMPOSITE_KEYS = frozenset({"operation", "layers_base64", "output_format", "output_quality", "return_base64",
                            "r2", "archive"})

Operation = Literal["edit", "edit_multi", "decompose", "composite"]
# An image URL as a job sends it; what it may reach is checked when it is fetched (src/plumbing/url_guard.py).
ImageUrl = Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^https?://")]
# The keys that carry a job's input images: one style per job.
IMAGE_KEYS = ("image_base64", "image_url", "image_urls")
Archive = Literal["zip", "psd", "ora"]


class InputError(ValueError):
    """Bad job input. The message is `<key>: <reason>` and never carries a payload."""


def _refuse_control_chars(text: str) -> str:
    found = _CONTROL_CHARS.search(text)
    if found:
        raise PydanticCustomError("control_character", "control character {char} at position {position}; "
                                  "only tab and line breaks are allowed",
                                  {"char": repr(found.group()), "position": found.start()})
    return text


# Text that goes to the tokenizer.
Prompt = Annotated[str, AfterValidator(_refuse_control_chars)]
_ONE_PROMPT = TypeAdapter(Annotated[str, Field(max_length=MAX_PROMPT_CHARS), AfterValidator(_refuse_control_chars)],
                          config=ConfigDict(strict=True))


def _prompt_or_prompts(value: Any) -> str | list[str]:
    """`prompt`: one instruction, or a list of them, each item named by its index in errors."""
    if not isinstance(value, list):
        return _one_prompt(value, ("prompt",))
    if not 1 <= len(value) <= MAX_PROMPTS_LIMIT:
        raise _rule("prompt", f"a list of {len(value)} prompts; give 1 to {MAX_PROMPTS_LIMIT}")
    return [_one_prompt(item, ("prompt", i)) for i, item in enumerate(value)]


def _one_prompt(value: Any, loc: tuple) -> str:
    try:
        return _ONE_PROMPT.validate_python(value)
    except ValidationError as exc:  # named as the model's own errors are, with the item's index
        raise _rule(_loc_text(loc), _describe({**exc.errors(include_url=False)[0], "loc": loc}).split(": ", 1)[1])


# One instruction, or several for the same images (edit and edit_multi).
Prompts = Annotated[str | list[str], PlainValidator(_prompt_or_prompts)]

_HEX_COLOUR = re.compile(r"#[0-9a-fA-F]{6}")


def _check_colour(text: str) -> str:
    if not _HEX_COLOUR.fullmatch(text):
        raise PydanticCustomError("colour", "a colour as '#rrggbb' (hex digits), e.g. '#ffffff'")
    return text.lower()


Colour = Annotated[str, AfterValidator(_check_colour)]


class BucketOverride(BaseModel):
    """A job's own bucket (the `r2` key), used instead of the worker's BUCKET_* settings."""

    model_config = ConfigDict(extra="forbid", strict=True)

    endpoint_url: str = Field(min_length=1, pattern=r"^https?://")
    access_key_id: str = Field(min_length=1)
    secret_access_key: SecretStr
    bucket_name: str = Field(min_length=1)
    region: str | None = None


def _refusal(reason: str) -> PydanticCustomError:
    """A validator's error whose text is `reason` as it is (braces and all)."""
    return PydanticCustomError("refused", "{reason}", {"reason": reason})


def _path_bytes(text: str) -> bytes:
    """`text` as the bytes a path would hold, or an error for what no path can hold."""
    found = _PATH_CONTROL_CHARS.search(text)
    if found:
        raise _refusal(f"control character {found.group()!r} at position {found.start()}; a path or URL "
                       "holds none")
    return text.encode()  # lone surrogates never get here: the strict str type refuses them


def _check_path_lengths(text: str) -> None:
    if len(_path_bytes(text)) > MAX_PATH_BYTES:
        raise _refusal(f"a path of {len(text.encode())} bytes; a path holds at most {MAX_PATH_BYTES}")
    longest = max(text.split("/"), key=lambda part: len(part.encode()))
    if len(longest.encode()) > MAX_NAME_BYTES:
        raise _refusal(f"a file or folder name of {len(longest.encode())} bytes; a name holds at most "
                       f"{MAX_NAME_BYTES}")


def _check_source(source: str) -> str:
    """A LoRA source that a URL, a repo id or a path can be; whether its file exists, stays
    inside its root and fits the model is found when the job runs (src/models/lora/sources.py)."""
    _path_bytes(source)
    scheme = _URL_SCHEME.match(source)
    if scheme and source.startswith(("https://", "http://")):
        return _check_http_source(source)
    if scheme and source.startswith("s3://"):
        return _check_s3_source(source)
    if scheme:
        raise _refusal(f"unsupported scheme {_short_repr(scheme[1])}: a source is an https://, http:// or "
                       "s3:// URL (the scheme in lower case), a Hugging Face repo id (owner/name) or a path "
                       "on the volume")
    if REPO_ID_SHAPE.fullmatch(source):
        return _check_repo_id(source)
    _check_path_lengths(source)
    return source


def _check_http_source(url: str) -> str:
    try:
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port
    except ValueError:
        raise _refusal(f"{_short_repr(url)} is not a URL whose host and port can be read") from None
    if not host:
        raise _refusal(f"{_short_repr(url)} has no host")
    return url


def _check_s3_source(url: str) -> str:
    bucket, _, key = url[len("s3://"):].partition("/")
    if not _S3_BUCKET.fullmatch(bucket):
        raise _refusal(f"{_short_repr(url)}: the bucket name is 1 to 255 letters, digits, '.', '_' or '-', "
                       "as in s3://bucket/key")
    if not key:
        raise _refusal(f"{_short_repr(url)} names no object; give s3://bucket/key")
    if len(key.encode()) > MAX_S3_KEY_BYTES:
        raise _refusal(f"an object key of {len(key.encode())} bytes; S3 keys hold at most {MAX_S3_KEY_BYTES}")
    return url


def _check_repo_id(repo_id: str) -> str:
    """The Hugging Face hub's rules for a repo id (huggingface_hub's validate_repo_id)."""
    owner, name = repo_id.split("/")
    why = None
    if len(repo_id) > MAX_REPO_ID_CHARS:
        why = f"{len(repo_id)} characters, at most {MAX_REPO_ID_CHARS}"
    elif "--" in repo_id or ".." in repo_id:
        why = "'--' and '..' are not allowed"
    elif any(part[0] in "-." or part[-1] in "-." for part in (owner, name)):
        why = "owner and name cannot start or end with '-' or '.'"
    if why:
        raise _refusal(f"{_short_repr(repo_id)} reads as a Hugging Face repo id (owner/name) and is not a "
                       f"valid one ({why}); name a file on the volume by its absolute path")
    return repo_id


def _check_weight_name(name: str) -> str:
    """A file inside the source's folder or snapshot, by a relative path that cannot leave it."""
    _path_bytes(name)
    if "\\" in name:
        raise _refusal("separate folders with '/', not '\\'")
    if name.startswith("/"):
        raise _refusal("a file inside the source's folder or snapshot, named by a relative path, "
                       "not an absolute one")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise _refusal("a file inside the source's folder or snapshot: no '..', '.' or empty parts")
    _check_path_lengths(name)
    return name


class LoraRequest(BaseModel):
    """One custom LoRA: a path on the volume, a repo id in the HF cache, or an https/s3 URL."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    # Lengths first, then the shape checks (which would otherwise run on a megabyte of text).
    source: Annotated[str, Field(min_length=1, max_length=MAX_SOURCE_CHARS), AfterValidator(_check_source)]
    scale: float = Field(1.0, ge=-4.0, le=4.0)
    weight_name: Annotated[str, Field(min_length=1, max_length=MAX_WEIGHT_NAME_CHARS),
                           AfterValidator(_check_weight_name)] | None = None


class LayerEdit(BaseModel):
    """One instruction applied to one layer of a decomposition, with the edit pipeline."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    layer: int = Field(ge=0, lt=MAX_LAYERS, description="index of the layer, 0 at the back")
    prompt: Prompt = Field(max_length=MAX_PROMPT_CHARS)
    negative_prompt: Prompt = Field(" ", max_length=MAX_PROMPT_CHARS)
    num_inference_steps: int | None = Field(None, ge=1, le=100, description="default 40, as for edit")
    true_cfg_scale: float = Field(4.0, ge=1.0, le=20.0)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT, description="null: the job's seed")

    @property
    def steps(self) -> int:
        return self.num_inference_steps or DEFAULT_STEPS["edit"]


class LayerSplit(BaseModel):
    """One layer of a decomposition decomposed again by the Layered pipeline, into sub-layers
    named `layer_<i>_<j>`, with the job's settings (steps, CFG, resolution, seed)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    layer: int = Field(ge=0, lt=MAX_LAYERS, description="index of the layer, 0 at the back")
    layers: int = Field(ge=2, le=MAX_LAYERS, description="its sub-layers")
    prompt: Prompt = Field("", max_length=MAX_PROMPT_CHARS,
                           description="describes the layer; empty: the model captions the layer itself")


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    operation: Operation = Field("edit", description="edit, edit_multi, decompose or composite")
    image_base64: str | None = Field(None, description="raw base64 or data URI; PNG, JPEG or WEBP; "
                                     "one of image_base64, image_url, image_urls is required except for composite")
    images_base64: list[str] = Field(default_factory=list, max_length=MAX_EXTRA_IMAGES,
                                     description="extra images for edit and edit_multi, after image_base64")
    image_url: ImageUrl | None = Field(None, description="the image by http(s) URL instead of image_base64")
    image_urls: list[ImageUrl] = Field(default_factory=list, max_length=MAX_EXTRA_IMAGES + 1,
                                       description="edit and edit_multi: all 1 to 3 images by URL")
    prompt: Prompts = Field(
        "", description="the instruction; optional for decompose (empty: the model captions the image); "
        "edit and edit_multi also take a list: one result per prompt, same images")
    num_images: int = Field(1, ge=1, le=MAX_IMAGES_PER_PROMPT,
                            description="edit and edit_multi: results per prompt, with seeds seed, seed+1, ...")
    negative_prompt: Prompt = Field(" ", max_length=MAX_PROMPT_CHARS)
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
    edits: list[LayerEdit] = Field(default_factory=list, max_length=MAX_LAYERS,
                                   description="decompose: instructions for single layers")
    split: list[LayerSplit] = Field(default_factory=list, max_length=MAX_LAYERS,
                                    description="decompose: layers decomposed again into sub-layers")
    resize_to_input: bool = Field(False, description="decompose: layers at the input image's size")
    cfg_normalize: bool = Field(True, description="decompose: rescale the CFG prediction to the conditional "
                                "one's norm, as the Qwen-Image-Layered authors run it")
    matte: Colour | None = Field(None, description="'#rrggbb' under RGBA images given to the edit model; "
                                 "default: the authors' green for one image, white for several")
    archive: Archive | None = Field(None, description="decompose and composite: the layers in one file")
    layers_base64: list[str] = Field(default_factory=list, max_length=MAX_COMPOSITE_LAYERS,
                                     description="composite: RGBA layers, back to front, all one size")

    @model_validator(mode="after")
    def _check_operation_rules(self) -> "JobRequest":
        if self.operation == "composite":
            return self._check_composite_rules()
        self._check_image_keys()
        if "layers_base64" in self.model_fields_set:
            raise _rule("layers_base64", "only used by composite")
        if self.operation in ("edit", "edit_multi"):
            self._check_prompts()
        if self.operation == "edit_multi" and len(self.image_sources) < 2:
            raise _rule("image_urls" if self.image_urls else "images_base64",
                        "edit_multi needs 2 or 3 images in all: image_base64 plus 1 or 2 in images_base64, "
                        "or 2 or 3 in image_urls; got 1 image")
        if self.operation == "decompose":
            if isinstance(self.prompt, list):
                raise _rule("prompt", "decompose takes one prompt (a string), not a list")
            for key in ("width", "height", "auto_resize", "snap"):
                if key in self.model_fields_set and getattr(self, key):
                    raise _rule(key, "not used by decompose (its size comes from resolution: 640 or 1024)")
            for key in ("images_base64", "image_urls", "num_images", "lightning", "loras"):
                if key in self.model_fields_set and getattr(self, key):
                    raise _rule(key, "not used by decompose (edit and edit_multi only)")
            self._check_layer_output_format()
            self._check_edits()
            self._check_splits()
            if "matte" in self.model_fields_set and not self.edits:
                raise _rule("matte", "only used when RGBA images go to the edit model: edit, edit_multi, "
                            "or decompose with edits")
        else:
            for key in ("layers", "resolution", "edits", "split", "resize_to_input", "cfg_normalize"):
                if key in self.model_fields_set:
                    raise _rule(key, "only used by decompose")
            if "archive" in self.model_fields_set:
                raise _rule("archive", "only used by decompose and composite")
        if self.lightning is not None:
            steps = self.num_inference_steps
            if steps is not None and steps != self.lightning:
                raise _rule("num_inference_steps", f"lightning {self.lightning} runs {self.lightning} steps; "
                            f"got {steps} (leave it out)")
            if "true_cfg_scale" in self.model_fields_set and self.true_cfg_scale != 1.0:
                raise _rule("true_cfg_scale", f"lightning runs without true CFG (1.0); got {self.true_cfg_scale}")
        return self

    def _check_image_keys(self) -> None:
        if self.images_base64 and self.image_base64 is None:
            raise _rule("images_base64", "extra images come after image_base64; by URL, send all images "
                        "in image_urls")
        given = [key for key in IMAGE_KEYS if getattr(self, key) not in (None, [])]
        if not given:
            raise _rule("image_base64", "required: the image as image_base64, or by URL as image_url "
                        "(image_urls for several)")
        if len(given) > 1:
            raise _rule(given[1], f"one style of image input per job; got both {given[0]} and {given[1]} "
                        "(send all images as base64 or all by URL)")

    def _check_prompts(self) -> None:
        for i, text in enumerate(self.prompts):
            if not text.strip():
                key = f"prompt[{i}]" if isinstance(self.prompt, list) else "prompt"
                raise _rule(key, f"required and non-empty for {self.operation}")

    def _check_composite_rules(self) -> "JobRequest":
        for key in sorted(self.model_fields_set - COMPOSITE_KEYS):
            if getattr(self, key) is not None:
                raise _rule(key, "not used by composite (it stacks layers_base64 on the CPU and runs no model)")
        if not self.layers_base64:
            raise _rule("layers_base64", f"required for composite: 1 to {MAX_COMPOSITE_LAYERS} RGBA images, "
                        "back to front, all the same size")
        self._check_layer_output_format()
        return self

    def _check_layer_output_format(self) -> None:
        if self.output_format in ALPHA_FORMATS:
            return
        if self.archive is not None:
            raise _rule("archive", f"the archive comes with the layers as images, and {self.output_format!r} "
                        f"cannot hold their alpha; use output_format {' or '.join(ALPHA_FORMATS)}")
        raise _rule("output_format", f"{self.output_format!r} cannot hold the layers' alpha; "
                    f"{self.operation} allows {' or '.join(ALPHA_FORMATS)}")

    def _no_such_layer(self, key: str, layer: int) -> "_RuleError":
        return _rule(key, f"layer {layer} does not exist: this decomposition makes layers 0 to "
                     f"{self.layers - 1} (layers: {self.layers})")

    def _check_edits(self) -> None:
        edited_by: dict[int, int] = {}
        for i, edit in enumerate(self.edits):
            if edit.layer >= self.layers:
                raise self._no_such_layer(f"edits[{i}].layer", edit.layer)
            if edit.layer in edited_by:
                raise _rule(f"edits[{i}].layer", f"layer {edit.layer} is already edited by "
                            f"edits[{edited_by[edit.layer]}]; one edit per layer (put both instructions in one prompt)")
            edited_by[edit.layer] = i
            if not edit.prompt.strip():
                raise _rule(f"edits[{i}].prompt", "required and non-empty")

    def _check_splits(self) -> None:
        split_by: dict[int, int] = {}
        edited = {edit.layer: i for i, edit in enumerate(self.edits)}
        for i, split in enumerate(self.split):
            if split.layer >= self.layers:
                raise self._no_such_layer(f"split[{i}].layer", split.layer)
            if split.layer in split_by:
                raise _rule(f"split[{i}].layer", f"layer {split.layer} is already split by "
                            f"split[{split_by[split.layer]}]; one split per layer")
            if split.layer in edited:
                raise _rule(f"split[{i}].layer", f"layer {split.layer} is edited by edits[{edited[split.layer]}]; "
                            "a layer is either edited or split (send the edited layer to a decompose job of its own)")
            split_by[split.layer] = i
        total = sum(split.layers for split in self.split)
        if total > MAX_SUB_LAYERS:
            counts = " + ".join(str(split.layers) for split in self.split)
            raise _rule("split", f"{total} sub-layers in all ({counts}); at most {MAX_SUB_LAYERS} in one job "
                        "(split fewer layers, or into fewer sub-layers)")

    # --- derived values -------------------------------------------------
    @property
    def steps(self) -> int:
        return self.num_inference_steps or self.lightning or DEFAULT_STEPS[self.operation]

    @property
    def cfg_scale(self) -> float:
        """true_cfg_scale as run: Lightning's distilled steps run without true CFG."""
        return 1.0 if self.lightning else self.true_cfg_scale

    @property
    def image_sources(self) -> list[tuple[str, str]]:
        """(key, value) of each input image, in order: base64 payloads or URLs."""
        if self.image_url:
            return [("image_url", self.image_url)]
        if self.image_urls:
            return [(f"image_urls[{i}]", url) for i, url in enumerate(self.image_urls)]
        return [("image_base64", self.image_base64)] + [
            (f"images_base64[{i}]", data) for i, data in enumerate(self.images_base64)]

    @property
    def prompts(self) -> list[str]:
        return self.prompt if isinstance(self.prompt, list) else [self.prompt]

    def output_seed(self, seed: int, index: int) -> int:
        """The seed of result `index` (prompts first, then each prompt's images): the job's
        seed plus the index, wrapping within the schema's range so that it is a seed a
        single-image job can ask for."""
        return (seed + index) % SEED_LIMIT

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

    def matte_for(self, image_count: int) -> str:
        """The matte RGBA inputs are flattened onto: the job's, else the default for this many images."""
        if self.matte is not None:
            return self.matte
        return SINGLE_IMAGE_MATTE if image_count == 1 else MULTI_IMAGE_MATTE

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
        raise InputError(error_text(_describe(exc.errors(include_url=False)[0]))) from None


def error_text(message: str) -> str:
    """An error as a job's reply and the log may carry it: every URL's secret parts taken
    out (src/job/redaction.py), at most MAX_ERROR_CHARS long."""
    return _bounded(redact(message))


# The job's nested objects, by the key that holds them; each error about one names its keys.
_NESTED_BY_KEY = {"r2": BucketOverride, "loras": LoraRequest, "edits": LayerEdit, "split": LayerSplit}
_NESTED_MODELS = {model.__name__: model for model in _NESTED_BY_KEY.values()}
_NESTED_EXAMPLES = {"BucketOverride": '{"endpoint_url": "https://...", "access_key_id": "...", '
                                      '"secret_access_key": "...", "bucket_name": "..."}',
                    "LoraRequest": '{"source": "owner/name", "scale": 0.8}',
                    "LayerEdit": '{"layer": 1, "prompt": "make it red"}',
                    "LayerSplit": '{"layer": 1, "layers": 3}'}


def _describe(error: dict) -> str:
    """One pydantic error as `<key>: <reason>`, with the value unless it is a payload or
    may hold a secret."""
    ctx_error = (error.get("ctx") or {}).get("error")
    if isinstance(ctx_error, _RuleError):
        return f"{ctx_error.key}: {ctx_error.reason}"
    parts = error["loc"]
    loc = _loc_text(parts)
    if error["type"] == "extra_forbidden":
        model = _NESTED_BY_KEY.get(parts[0], JobRequest) if len(parts) > 1 else JobRequest
        return f"{loc}: unknown key; allowed keys: {', '.join(model.model_fields)}"
    if error["type"] == "missing":
        return f"{loc}: required"
    if error["type"] == "too_long" and isinstance(error.get("input"), list):
        return f"{loc}: {_too_many(parts[-1], error['ctx']['actual_length'], error['ctx']['max_length'])}"
    if error["type"] == "model_type":
        name = error["ctx"]["class_name"]
        text = (f"{loc}: must be an object with the keys {', '.join(_NESTED_MODELS[name].model_fields)}, "
                f"e.g. {_NESTED_EXAMPLES[name]}")
        return f"{text}; got {_short_repr(error.get('input'))}" if _may_echo(parts) else text
    if error["type"] == "list_type" and len(parts) == 1 and parts[0] in _LIST_TEXTS:
        text = f"{loc}: {_LIST_TEXTS[parts[0]]}"
        return f"{text}; got {_short_repr(error.get('input'))}" if _may_echo(parts) else text
    message = error["msg"][0].lower() + error["msg"][1:]
    if error["type"] == "string_pattern_mismatch":
        message = _PATTERN_TEXTS.get(error["ctx"]["pattern"], message)
    if not _may_echo(parts):
        return f"{loc}: {message}"
    strict_hint = _STRICT_HINTS.get(error["type"], "") if isinstance(error.get("input"), str) else ""
    return f"{loc}: {message}; got {_short_repr(error.get('input'))}{strict_hint}"


# Readable texts for the schema's patterns (pydantic would show the regular expression).
_PATTERN_TEXTS = {
    r"^https?://": "must start with http:// or https://",
    r"^[^/\\][^\\]*$": "a file name inside the source, as in the repo or folder: no leading '/' and no '\\'",
}
# A single value where a list belongs: what the list holds.
_LIST_TEXTS = {
    "images_base64": "must be a list of base64 strings, one per extra image, even for one",
    "image_urls": "must be a list of URLs, one per image, even for one (or send one image as image_url)",
    "layers_base64": "must be a list of base64 strings, one per layer",
    "loras": 'must be a list of objects, one per LoRA, e.g. [{"source": "owner/name", "scale": 0.8}]',
    "edits": 'must be a list of objects, one per layer edit, e.g. [{"layer": 1, "prompt": "make it red"}]',
    "split": 'must be a list of objects, one per layer to decompose again, e.g. [{"layer": 1, "layers": 3}]',
}
# Strict types: a number or a boolean sent as a string says how to send it.
_STRICT_HINTS = {"int_type": " (send a JSON number, not a string)", "float_type": " (send a JSON number, not a string)",
                 "bool_type": " (send JSON true or false, not a string)"}


def _too_many(key: str | int, count: int, limit: int) -> str:
    """A list over its limit, said in the terms of its key (images are counted in all)."""
    if key == "images_base64":
        return (f"{count} extra images, {count + 1} in all counting image_base64; at most {limit + 1} images in "
                f"all (image_base64 plus up to {limit} here)")
    if key == "image_urls":
        return f"{count} image URLs; at most {limit} images in all"
    if key == "layers_base64":
        return f"{count} layers; at most {limit} in one composite job"
    if key == "edits":
        return f"{count} edits; at most {limit} (one per layer)"
    return f"{count} items; at most {limit} allowed"


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,%d}" % MAX_ECHO_CHARS)


def _loc_text(parts: tuple) -> str:
    """`edits[1].layer`; a key that is not a plain name (an unknown key sent with control
    characters, or a megabyte long) shown as its cut repr."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = part if isinstance(part, str) and _PLAIN_KEY.fullmatch(part) else _short_repr(part)
            text += f".{name}" if text else name
    return text or "input"


def _may_echo(parts: tuple) -> bool:
    return not parts or not (parts[0] in PAYLOAD_KEYS or parts[0] in SECRET_KEYS or parts[-1] in SECRET_FIELDS)


class _Echo(reprlib.Repr):
    """repr() that stays short and safe to build for any JSON value: two levels of
    nesting, a few items, strings cut, no integer spelled out past 64 bits (Python
    refuses to write one of over 4300 digits at all)."""

    def __init__(self):
        super().__init__()
        self.maxlevel = 2
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = 4
        self.maxstring = self.maxother = MAX_ECHO_CHARS

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 64:
            return f"{'a negative' if x < 0 else 'an'} integer of {x.bit_length()} bits"
        return repr(x)

    def repr_str(self, x: str, level: int) -> str:
        x = redact(x)  # before the cut, which could leave a secret too short to be read as one
        cut = repr(x[:MAX_ECHO_CHARS])
        return cut if len(x) <= MAX_ECHO_CHARS else f"{cut}... ({len(x)} characters)"


_ECHO = _Echo()


def _short_repr(value: Any) -> str:
    return _ECHO.repr(value)


def echo(value: Any) -> str:
    """A value as an error may quote it, whatever it holds: its repr with URL secrets taken
    out, cut to MAX_ECHO_CHARS per string and to a few items and levels."""
    return _short_repr(value)


def _bounded(text: str) -> str:
    """A last bound on the whole text (a key cut to MAX_ECHO_CHARS may still repr long)."""
    cut = "... (cut short)"
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - len(cut)] + cut
