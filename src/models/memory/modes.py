"""Where the weights live on the GPU: one memory mode per worker, chosen at start.

    resident      everything on the GPU (an 80 GB card)
    text_offload  the 7B text encoder waits in pinned CPU memory and streams in layer by
                  layer for each prompt; the transformer and VAE stay on the GPU (a 48 GB card)
    offload       the transformers stream in too, one block ahead of the one running
                  (diffusers group offloading on a CUDA side stream): a 24 GB card runs,
                  bound by the PCIe link

`MEMORY_MODE=auto` (the default) takes the fastest mode that serves every job the schema
accepts, or at least every edit (src/models/memory/plan.py decides, with the transformer swap);
a mode can be forced. Streaming moves bytes only, so every mode returns the same images
(tests/models/test_memory.py).
"""

from __future__ import annotations

import itertools
import logging

import torch

log = logging.getLogger(__name__)

GIB = 1024**3


def free_gpu_bytes(device: torch.device) -> int:
    """What the GPU can still hold. Blocks torch has freed but keeps cached (FP8's bf16
    originals, a swapped-out transformer) count as used to the driver: they go back first."""
    torch.cuda.empty_cache()
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return free_bytes


def bytes_of(*modules: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for module in modules for p in module.parameters())


def place(pipeline, mode: str, device: torch.device, *, text_encoder_placed: bool = False) -> None:
    """Put a pipeline loaded on the CPU where `mode` says. The text encoder may be shared
    with a pipeline placed before (`text_encoder_placed`): it is then left as it is."""
    streamed = {"resident": (), "text_offload": ("text_encoder",), "offload": ("text_encoder", "transformer")}[mode]
    for name, module in pipeline.components.items():
        if not isinstance(module, torch.nn.Module) or (name == "text_encoder" and text_encoder_placed):
            continue
        if name not in streamed:
            module.to(device)
            continue
        if device.type == "cuda":
            pin_exactly(module)
        if name == "transformer":
            # One block of 60 in flight while the next is copied in on a side stream.
            module.enable_group_offload(device, offload_type="block_level", num_blocks_per_group=1,
                                        use_stream=device.type == "cuda", record_stream=device.type == "cuda")
        else:
            # The text encoder (a transformers model) has no top-level block list: leaf by leaf.
            from diffusers.hooks import apply_group_offloading

            apply_group_offloading(module, device, offload_type="leaf_level", use_stream=device.type == "cuda",
                                   record_stream=device.type == "cuda")


class HostMemoryError(RuntimeError):
    """CPU memory the worker needs is not there, or cannot be page-locked."""


class HostBlock:
    """Tensors shaped like `like`, as aligned views of one byte block of their exact size,
    in CPU memory (or on a GPU: `device`). Page-locked (`pin`) a CPU block serves copies to
    and from the GPU at the host link's speed without torch's pinned allocator, which
    rounds every block up to a power of two (register row 23)."""

    ALIGN = 64  # every view starts aligned for any dtype

    @classmethod
    def sizes(cls, like: list[torch.Tensor]) -> list[int]:
        """Each view's bytes in the block, aligned (their sum: the block's size)."""
        return [-(-tensor.nbytes // cls.ALIGN) * cls.ALIGN for tensor in like]

    def __init__(self, like: list[torch.Tensor], device: torch.device | str = "cpu"):
        sizes = self.sizes(like)
        self.block = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
        self.views = [self.block[start:start + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
                      for tensor, start in zip(like, itertools.accumulate([0, *sizes]))]
        self.pinned = False

    @classmethod
    def page_locked(cls, like: list[torch.Tensor]) -> "HostBlock":
        """An empty CPU block, page-locked before anything is written to it (copies from
        the GPU then run at the link's speed). Its pages are touched first by a zero fill,
        which torch spreads over every core: registering untouched memory makes the kernel
        fault its pages in one by one, on one thread."""
        host = cls(like)
        host.block.zero_()
        host.pin()
        return host

    @property
    def nbytes(self) -> int:
        return self.block.nbytes

    def pin(self) -> None:
        """Page-lock the block where it is (its pages already written: no second copy). It
        stays locked while this object lives."""
        error = torch.cuda.cudart().cudaHostRegister(self.block.data_ptr(), self.block.nbytes, 0)
        if int(error) != 0 or not self.block.is_pinned():
            raise HostMemoryError(f"could not page-lock {self.block.nbytes / GIB:.1f} GiB of CPU memory "
                                  f"(CUDA error {int(error)})")
        self.pinned = True

    def __del__(self):
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.block.data_ptr())


def gather_into_one_block(module: torch.nn.Module) -> HostBlock:
    """Move a CPU module's parameters and buffers into the views of one `HostBlock`, each
    original freed as soon as it is copied (so this needs no second copy of the module).
    The tensors keep the block alive; the module keeps the block object for its page lock."""
    tensors = list(dict.fromkeys(itertools.chain(module.parameters(), module.buffers())))
    host = HostBlock(tensors)
    for tensor, view in zip(tensors, host.views):
        view.copy_(tensor.data)
        tensor.data = view
    module._host_block = host
    return host


def pin_exactly(module: torch.nn.Module) -> None:
    """Page-lock a module's weights where they are, at their exact size.

    Why: diffusers' group offloading pins each tensor through torch's caching host
    allocator, which rounds every block up to a power of two (a 72 MiB linear takes 128 MiB)
    and holds all pinned copies beside the unpinned originals until every group is built:
    about twice the weights at start (register row 23). Tensors already pinned are used as
    they are (`Tensor.pin_memory` returns them), so one registered block replaces all that."""
    gather_into_one_block(module).pin()
