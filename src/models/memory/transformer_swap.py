"""TRANSFORMER_SWAP: the edit and Layered transformers taking turns on a GPU too small for both.

Each transformer gets one page-locked CPU copy of its prepared parameters (`HostTwin`),
made the first time it leaves the device, in one block of their exact size. Its weights do
not change while the worker runs: a LoRA set written into them is a change, and the caller
puts the base weights back before the transformer leaves (src/models/lora/switch.py
`to_base`). So leaving points the parameters back at the twin (no device-to-host copy, no
work), and coming in is one host-to-device copy of the block at the link's speed into one
device block the parameters then view.

Both twins stay in CPU memory (two transformers' bytes, page-locked). `host_room_for_twins`
checks that at start; where CPU memory is too small, the swap moves the weights as before
(`.to("cpu")` and back, pageable both ways) and says so in one log line. Either way the
transformer computes with the same bytes. On the CPU (tests) the twin is a plain block and
coming in copies it into fresh tensors, so the same code runs.
"""

from __future__ import annotations

import logging

import torch

from src.models.memory.modes import HostBlock

log = logging.getLogger(__name__)

GB = 1e9
# Left to the rest of the process (Python, the job's images, the CUDA context, pageable
# copies a load makes on its way to the GPU) beside the twins.
HOST_MARGIN_BYTES = 8 * 10**9


def host_room_for_twins(twins_bytes: int, available_bytes: int | None, other_bytes: int = 0) -> bool:
    """Whether CPU memory with `available_bytes` (None: unknown, as off Linux) holds the
    twins and `other_bytes` more that the start will pin (a LoRA set held in CPU memory)
    beside the process's margin."""
    return available_bytes is None or twins_bytes + other_bytes + HOST_MARGIN_BYTES <= available_bytes


class HostTwin:
    """A module's parameters in one CPU block (page-locked when `pin`), copied once from
    wherever they are; the module is pointed at it or copied in from it."""

    def __init__(self, module: torch.nn.Module, pin: bool):
        self.parameters = list(dict.fromkeys(module.parameters()))
        self.host = HostBlock.page_locked(self.parameters) if pin else HostBlock(self.parameters)
        with torch.no_grad():
            for view, parameter in zip(self.host.views, self.parameters):
                view.copy_(parameter.data, non_blocking=pin)
        if pin:
            torch.cuda.synchronize()

    @property
    def nbytes(self) -> int:
        return self.host.nbytes

    def point_at_host(self) -> None:
        """The module's parameters become views of the twin; what they held on the device is freed."""
        for parameter, view in zip(self.parameters, self.host.views):
            parameter.data = view

    def copy_in(self, device: torch.device) -> None:
        """One copy of the whole block onto `device`; the parameters become views of it."""
        block = HostBlock(self.parameters, device=device)
        block.block.copy_(self.host.block, non_blocking=self.host.pinned)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the move's cost lands in the job's `load` stage
        for parameter, view in zip(self.parameters, block.views):
            parameter.data = view


class TransformerSwap:
    """Moves a transformer off and onto the device: through its twin, or (`use_twins`
    False: too little CPU memory) with `.to`."""

    def __init__(self, device: torch.device, use_twins: bool):
        self.device = device
        self.use_twins = use_twins
        self._twins: dict[int, HostTwin] = {}  # by id of the transformer; made on its first leave
        self.moves_in = 0  # transformers brought onto the device, for the start-up log and the tests

    def twin_of(self, transformer: torch.nn.Module) -> HostTwin | None:
        return self._twins.get(id(transformer))

    def leave(self, transformer: torch.nn.Module) -> None:
        if not self.use_twins:
            transformer.to("cpu")
        else:
            twin = self._twins.get(id(transformer))
            if twin is None:
                twin = self._twins[id(transformer)] = HostTwin(transformer, pin=self.device.type == "cuda")
                log.info("transformer swap: %s's page-locked CPU copy made (%.1f GB)", type(transformer).__name__,
                         twin.nbytes / GB)
            twin.point_at_host()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the other transformer needs the room as one block

    def enter(self, transformer: torch.nn.Module) -> None:
        self.moves_in += 1
        twin = self._twins.get(id(transformer))
        if twin is not None:
            twin.copy_in(self.device)
        # Whatever its twin does not hold (or all of it, without one) to the device too: the
        # LoRA branches' buffers, allocated beside parameters waiting in CPU memory.
        transformer.to(self.device)
