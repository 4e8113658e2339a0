"""Load the Qwen2-VL processor of a Qwen-Image pipeline, with or without torchvision.

QwenImageEditPlusPipeline and QwenImageLayeredPipeline need a ``Qwen2VLProcessor``
(text + images for the Qwen2.5-VL text encoder), stored in the repo's
``processor/`` folder. In transformers 5 that processor also holds a video
processor, which requires torchvision: without torchvision
``Qwen2VLProcessor.from_pretrained`` (and therefore the pipelines' own loading of
``processor/``) raises ImportError, although the pipelines never pass videos.

``load_processor`` uses the plain loader where torchvision is installed (the GPU
image) and otherwise builds an image-only processor from the same folder's image
processor config and tokenizer (CPU test environments). Pass the result to
``from_pretrained(..., processor=...)`` of either pipeline.
"""

from __future__ import annotations

import os

from huggingface_hub import snapshot_download
from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin
from transformers.utils import is_torchvision_available

PROCESSOR_SUBFOLDER = "processor"


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """A ``Qwen2VLProcessor`` without a video processor: images and text only.

    ``ProcessorMixin`` derives a processor's parts from its ``__init__`` signature,
    so leaving ``video_processor`` out of it is what drops the video part.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # Same token attributes as Qwen2VLProcessor.__init__, which cannot be
        # called because it always forwards a video processor to ProcessorMixin.
        self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
        self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token
        )
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)


def load_processor(repo_id: str, revision: str | None = None) -> Qwen2VLProcessor:
    """The ``processor/`` component of a Qwen-Image pipeline repo.

    ``repo_id`` is a hub repo id, resolved through the HF cache (HF_HOME and
    HF_HUB_OFFLINE from the environment apply), or a local pipeline folder such
    as a cache snapshot directory (``revision`` is then ignored).
    """
    repo_id = os.fspath(repo_id)  # a pathlib.Path works too
    if os.path.isdir(repo_id):
        folder = repo_id
    else:
        # Resolve to the snapshot folder first: with a hub id and HF_HUB_OFFLINE=1,
        # AutoTokenizer fails on the processor/config.json that the repo does not have.
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=[f"{PROCESSOR_SUBFOLDER}/*"])
    if is_torchvision_available():
        return Qwen2VLProcessor.from_pretrained(folder, subfolder=PROCESSOR_SUBFOLDER)
    return ImageOnlyQwen2VLProcessor(
        image_processor=AutoImageProcessor.from_pretrained(folder, subfolder=PROCESSOR_SUBFOLDER),
        tokenizer=AutoTokenizer.from_pretrained(folder, subfolder=PROCESSOR_SUBFOLDER),
    )
