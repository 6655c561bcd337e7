"""One block of a partitioned model: which of the model's submodules it owns and how it runs.

A model is cut into an ordered list of pieces. Pieces pass a *carry* (a dict of tensors and small
Python values) from one to the next, so running every piece in order equals the unpartitioned forward.
A piece owns submodules of the parent model by qualified name, so the weights of a block are exactly a
slice of the parent's ``state_dict`` with upstream key names: a released checkpoint splits into block
files without renaming, and block files join back into a checkpoint that loads with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

Carry = dict[str, Any]


@dataclass(frozen=True)
class Piece:
    """A block: its ``name`` (e.g. ``block03``), the submodules it owns, and its forward over the carry."""

    name: str
    owns: tuple[str, ...]
    forward: Callable[[Carry], Carry] = field(repr=False)

    def param_names(self, model: nn.Module) -> list[str]:
        """The parent ``state_dict`` keys (parameters and persistent buffers) this piece owns."""
        keys = list(model.state_dict(keep_vars=True).keys())
        return [k for k in keys if any(k == o or k.startswith(o + ".") for o in self.owns)]

    def __call__(self, carry: Carry) -> Carry:
        return self.forward(carry)


def run_pieces(pieces: list[Piece], carry: Carry) -> Carry:
    """Run pieces in order: the partitioned forward."""
    for piece in pieces:
        carry = piece(carry)
    return carry
