"""The layer workflow's results: a decomposition's layers, the layers its edits
replaced, the sub-layers its splits made, their sizes, their composites and the names
they are stored under.

Layers are always back to front (index 0 at the back). Original layers are named
`layer_<i>` with their composite `composite`; sub-layers of a split layer
`layer_<i>_<j>`; edited layers `edited_layer_<i>`, and the composite of the stack with
the edited layers in place `composite_edited`. Every composite here is the alpha-over
of the very layers returned or archived with it, so a client that stacks them gets the
composite exactly. In an archive a split layer is a group of its sub-layers, in its place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from PIL import Image

from src.job.schema import InputError, JobRequest
from src.serving.archives import ArchiveStack
from src.serving.operations import composite


def sub_layer_name(layer: int, index: int) -> str:
    return f"layer_{layer}_{index}"


@dataclass(frozen=True)
class LayerStack:
    """Original layers; by index, the edited ones that replace them and the sub-layers
    split layers were decomposed into (a layer is edited or split, never both)."""

    originals: list[Image.Image]
    edited: dict[int, Image.Image] = field(default_factory=dict)
    splits: dict[int, list[Image.Image]] = field(default_factory=dict)

    @property
    def final(self) -> list[Image.Image]:
        """The stack as the job leaves it: edited layers in place of their originals."""
        return [self.edited.get(i, layer) for i, layer in enumerate(self.originals)]

    @cached_property
    def final_composite(self) -> Image.Image:
        """The composite of `final`; computed once, for the images and the archive."""
        return composite(self.final)

    def final_names(self) -> list[str]:
        return [f"edited_layer_{i}" if i in self.edited else f"layer_{i}" for i in range(len(self.originals))]

    def resized(self, size: tuple[int, int]) -> "LayerStack":
        """Every layer at `size` (Lanczos; Pillow resizes RGBA with premultiplied alpha,
        so no dark fringes appear where alpha falls off)."""
        def fit(layer: Image.Image) -> Image.Image:
            return layer if layer.size == size else layer.resize(size, Image.Resampling.LANCZOS)

        return LayerStack([fit(layer) for layer in self.originals],
                          {i: fit(layer) for i, layer in self.edited.items()},
                          {i: [fit(layer) for layer in sub_layers] for i, sub_layers in self.splits.items()})

    def archived(self) -> ArchiveStack:
        """The stack an archive holds: `final`, named, with each split layer replaced by a
        group of that name holding its sub-layers."""
        return [(name, [(sub_layer_name(i, j), sub) for j, sub in enumerate(self.splits[i])])
                if i in self.splits else (name, layer)
                for i, (name, layer) in enumerate(zip(self.final_names(), self.final))]

    @property
    def archived_layer_count(self) -> int:
        """The archive's pixel layers: a split layer counts as its sub-layers."""
        return sum(len(self.splits.get(i, [layer])) for i, layer in enumerate(self.originals))

    @cached_property
    def archived_composite(self) -> Image.Image:
        """The alpha-over of what the archive holds: `final_composite` unless a layer is
        split, when the sub-layers stand in for it."""
        if not self.splits:
            return self.final_composite
        leaves = [self.splits.get(i, [layer]) for i, layer in enumerate(self.final)]
        return composite([layer for group in leaves for layer in group])

    def named_images(self) -> list[tuple[str, Image.Image]]:
        """What the job stores: the originals and their composite, the split layers'
        sub-layers (by layer, each back to front), then the edited layers (back to front)
        and the composite of the final stack."""
        named = [(f"layer_{i}", layer) for i, layer in enumerate(self.originals)]
        # Without edits the final stack is the original one: its composite serves both.
        named.append(("composite", composite(self.originals) if self.edited else self.final_composite))
        named += [(sub_layer_name(i, j), sub) for i in sorted(self.splits) for j, sub in enumerate(self.splits[i])]
        if self.edited:
            named += [(f"edited_layer_{i}", self.edited[i]) for i in sorted(self.edited)]
            named.append(("composite_edited", self.final_composite))
        return named


def check_edit_count(request: JobRequest, max_edits: int) -> None:
    count = len(request.edits)
    if count > max_edits:
        raise InputError(f"edits: {count} edit{'' if count == 1 else 's'}; at most {max_edits} in one job "
                         "(MAX_LAYER_EDITS)")


def edit_seed(request: JobRequest, index: int, job_seed: int) -> int:
    """An edit's own seed, else the job's: a job sent again with its returned seed
    gives the same layers and the same edits."""
    seed = request.edits[index].seed
    return job_seed if seed is None else seed


def check_same_size(layers: list[Image.Image]) -> None:
    """`composite` stacks layers pixel for pixel: they must all be one size."""
    width, height = layers[0].size
    for i, layer in enumerate(layers[1:], start=1):
        if layer.size != (width, height):
            raise InputError(f"layers_base64[{i}]: {layer.width}x{layer.height}, but layers_base64[0] is "
                             f"{width}x{height}; all layers must be the same size")


def describe_layers(entries: list[dict], request: JobRequest, job_seed: int) -> dict:
    """The decompose output keys, picked from the stored entries by name: `layers` and
    `composite` always; `splits` (by layer: its sub-layers) when the job split layers;
    `edited_layers` (each with the edit's settings as run) and `composite_edited` when
    the job had edits."""
    by_name = {entry["name"]: entry for entry in entries}
    output: dict = {
        "layers": [dict(by_name[f"layer_{i}"], index=i) for i in range(request.layers)],
        "composite": by_name["composite"],
    }
    if request.split:
        output["splits"] = [
            {"layer": split.layer,
             "layers": [dict(by_name[sub_layer_name(split.layer, j)], index=j) for j in range(split.layers)]}
            for split in sorted(request.split, key=lambda split: split.layer)
        ]
    if request.edits:
        order = sorted(range(len(request.edits)), key=lambda i: request.edits[i].layer)
        output["edited_layers"] = [
            dict(by_name[f"edited_layer_{request.edits[i].layer}"], index=request.edits[i].layer,
                 seed=edit_seed(request, i, job_seed), num_inference_steps=request.edits[i].steps,
                 true_cfg_scale=request.edits[i].true_cfg_scale)
            for i in order
        ]
        output["composite_edited"] = by_name["composite_edited"]
    return output
