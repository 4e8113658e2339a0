"""FP8_PACK_QKV: each attention's three projections of one stream as one FP8 matmul.

The image stream's `to_q`/`to_k`/`to_v` read the same tensor, and so do the text stream's
`add_q_proj`/`add_k_proj`/`add_v_proj`. Packed (`pack_projections`), each triple's e4m3 weights
are stacked along the output, each row keeping its own values and float32 scale; the input is
quantized once per call and multiplied once. Packing runs once the block linears are FP8
(quantized at start or loaded from the FP8 cache), on whatever device they are on.

Invariants: every output element is the same rescaled dot product as unpacked (bit for bit on
the CPU). The three linears stay modules under their own names (`ProjectionView`): the first
call runs the packed matmul and holds its output until the other two take their columns
(strided views, no copy); a view called on another tensor computes its own rows only; a view's
`weight`, `weight_scale` and `bias` are views of the packed rows, read at each access, so the
FP8 LoRA fuse, LoRA branches and the transformer swap work through them. The packed module
owns the parameters (`attn.packed_qkv`, `attn.packed_added_qkv`): each byte is held once.
"""

from __future__ import annotations

import torch

from src.models.fp8.linear import PACKED_PROJECTIONS, Fp8Linear


class PackedFp8Linear(Fp8Linear):
    """`Fp8Linear`s of one input stacked along the output: one quantization of the input,
    one scaled matmul. Not a linear of the model (no LoRA touches it by name): its
    `ProjectionView`s are."""

    def __init__(self, linears: list[Fp8Linear]):
        torch.nn.Module.__init__(self)
        self.in_features = linears[0].in_features
        if any(linear.in_features != self.in_features for linear in linears):
            raise ValueError("packed linears must read inputs of one width")
        has_bias = {linear.bias is not None for linear in linears}
        if len(has_bias) != 1:
            raise ValueError("packed linears must all have a bias or none")
        self.out_features = sum(linear.out_features for linear in linears)
        with torch.no_grad():
            self.weight = torch.nn.Parameter(torch.cat([linear.weight for linear in linears]), requires_grad=False)
            self.weight_scale = torch.nn.Parameter(torch.cat([linear.weight_scale for linear in linears], dim=1),
                                                   requires_grad=False)
            self.bias = None if not has_bias.pop() else torch.nn.Parameter(
                torch.cat([linear.bias for linear in linears]), requires_grad=False)
        starts = [0]
        for linear in linears:
            starts.append(starts[-1] + linear.out_features)
        self.bounds = tuple(zip(starts[:-1], starts[1:]))
        self._everyone = (1 << len(linears)) - 1
        self._forget()

    def _forget(self) -> None:
        # The input of the last packed call, its output, and which parts have been taken
        # (one bit each): held only between the first and the last of the three calls.
        self._held_input, self._held_output, self._taken = None, None, 0

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Part `index`'s output for `x`: columns of one packed matmul shared by the parts
        called on this same tensor."""
        if self._held_input is not x:
            self._held_input, self._held_output, self._taken = x, self(x), 0
        start, stop = self.bounds[index]
        out = self._held_output[..., start:stop]
        self._taken |= 1 << index
        if self._taken == self._everyone:
            self._forget()
        return out

    def rows(self, index: int) -> slice:
        start, stop = self.bounds[index]
        return slice(start, stop)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, packs {len(self.bounds)}"


class ProjectionView(Fp8Linear):
    """One of a `PackedFp8Linear`'s linears, under its own name: its output, weight, row
    scales and bias are the packed ones' rows. An `Fp8Linear` to every caller (the LoRA
    fuse writes its weight in place)."""

    def __init__(self, packed: PackedFp8Linear, index: int):
        torch.nn.Module.__init__(self)
        # Not a submodule: the packed module is named once, under the attention.
        object.__setattr__(self, "packed", packed)
        self.index = index
        self.in_features = packed.in_features
        start, stop = packed.bounds[index]
        self.out_features = stop - start

    @property
    def weight(self) -> torch.Tensor:
        return self.packed.weight[self.packed.rows(self.index)]

    @property
    def weight_scale(self) -> torch.Tensor:
        return self.packed.weight_scale[:, self.packed.rows(self.index)]

    @property
    def bias(self) -> torch.Tensor | None:
        bias = self.packed.bias
        return None if bias is None else bias[self.packed.rows(self.index)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.packed.part(x, self.index)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 row-wise, " \
               f"part {self.index} of a packed projection"


def pack_projections(transformer: torch.nn.Module) -> int:
    """Pack each block's Q/K/V triples that are all `Fp8Linear`s (a triple FP8_KEEP_BF16
    keeps, wholly or partly, stays as it is), in place. Returns how many triples were packed
    (0 for a transformer already packed)."""
    packed = 0
    for block in transformer.transformer_blocks:
        attention = block.attn
        for packed_name, names in PACKED_PROJECTIONS.items():
            linears = [getattr(attention, name, None) for name in names]
            if not all(type(linear) is Fp8Linear for linear in linears):
                continue
            stack = PackedFp8Linear(linears)
            attention.add_module(packed_name, stack)
            for index, name in enumerate(names):
                setattr(attention, name, ProjectionView(stack, index))
            packed += 1
    return packed


def unpack_projections(transformer: torch.nn.Module) -> int:
    """Undo `pack_projections` (separate `Fp8Linear`s with copies of the rows again), in
    place; for the bench, which compares both. Returns how many triples were unpacked."""
    unpacked = 0
    for block in transformer.transformer_blocks:
        attention = block.attn
        for packed_name, names in PACKED_PROJECTIONS.items():
            stack = getattr(attention, packed_name, None)
            if not isinstance(stack, PackedFp8Linear):
                continue
            for index, name in enumerate(names):
                view = getattr(attention, name)
                linear = Fp8Linear.__new__(Fp8Linear)
                torch.nn.Module.__init__(linear)
                linear.in_features, linear.out_features = view.in_features, view.out_features
                linear.weight = torch.nn.Parameter(view.weight.clone(), requires_grad=False)
                linear.weight_scale = torch.nn.Parameter(view.weight_scale.contiguous().clone(), requires_grad=False)
                linear.bias = None if view.bias is None else torch.nn.Parameter(view.bias.clone(), requires_grad=False)
                setattr(attention, name, linear)
            delattr(attention, packed_name)
            unpacked += 1
    return unpacked
