"""Fit one model variant's pieces exactly from measurements: FLOPs and working bytes as integer polynomials.

A ``Spec`` is one model variant measured over one or two ``Group``s of shapes (a group = one op sequence).
Per group, the FLOPs of each piece and the live bytes after each of its ops are fitted over the group's
monomial basis (:func:`cidl.runtime.polyfit.fit_exact`); the op sequence must be the same at every shape of
the group (checked). Two groups (TDTM's even and odd T) are joined as ``p0 + selector * (p1 - p0)`` with a
selector that is 0 on the first group and 1 on the second, the ops of the two sequences paired by alignment,
so a joined live-bytes polynomial is, in either group, the live bytes after some op of that group's sequence.
The working bytes are the max (``MaxPoly``) of the joined per-op polynomials that are the exact largest at
some measured or grid shape; everything is then verified with integer equality on every measured shape,
the held-out ones included.
"""

from __future__ import annotations

import difflib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from cidl.runtime.measure import PieceMeasure
from cidl.runtime.polyfit import (
    IPoly,
    Mono,
    Shape,
    design,
    fit_exact,
    mono_text,
    poly_add,
    poly_key,
    poly_mul,
    poly_text,
    poly_value,
    to_max_poly,
    to_poly,
)
from cidl.scheduler.costmodel import ExecCost, ModelName, Variant

Runner = Callable[[Shape], list[PieceMeasure]]


@dataclass(frozen=True)
class Group:
    """Shapes that share one op sequence, fitted over one basis: ``fit`` to solve, ``held`` to verify,
    ``grid`` (realistic, unmeasured) to choose the working-bytes candidates on."""

    name: str
    basis: tuple[Mono, ...]
    fit: list[dict[str, int]]
    held: list[dict[str, int]]
    grid: list[dict[str, int]]


@dataclass(frozen=True)
class Spec:
    """One model variant: one group, or two joined as ``p0 + selector * (p1 - p0)``."""

    model: ModelName
    variant: Variant
    groups: list[Group]
    selector: IPoly = field(default_factory=dict)  # 0 on groups[0], 1 on groups[1]


def choose_shapes(basis: Sequence[Mono], draw: Callable[[random.Random], dict[str, int]],
                  realistic: dict[str, int], seed: int, extra_fit: int = 1, held_out: int = 1,
                  ) -> tuple[list[dict[str, int]], list[dict[str, int]]]:
    """Deterministic small shapes: just enough to identify ``basis`` plus ``extra_fit`` (fit), then
    ``held_out`` other ones and ``realistic`` (held out)."""
    rng = random.Random(seed)
    seen: set[tuple[tuple[str, int], ...]] = set()

    def fresh() -> dict[str, int]:
        for _ in range(10_000):
            s = draw(rng)
            key = tuple(sorted(s.items()))
            if key not in seen:
                seen.add(key)
                return s
        raise ValueError(f"too few distinct shapes for basis {[mono_text(m) for m in basis]}")

    fit: list[dict[str, int]] = []
    while len(fit) < len(basis):
        s = fresh()
        if _rank(basis, fit + [s]) > len(fit):  # keep only shapes that identify one more coefficient
            fit.append(s)
    fit += [fresh() for _ in range(extra_fit)]
    return fit, [fresh() for _ in range(held_out)] + [realistic]


def _rank(basis: Sequence[Mono], shapes: Sequence[Shape]) -> int:
    if not shapes:
        return 0
    a = design(basis, shapes)
    return int(np.linalg.matrix_rank(a / np.abs(a).max(axis=0).clip(min=1)))


@dataclass
class GroupFit:
    shapes: list[dict[str, int]]  # fit shapes, then held-out ones
    n_fit: int
    measures: list[list[PieceMeasure]]  # [shape][piece]
    flops: list[IPoly]  # per piece
    live: list[list[IPoly | None]]  # [piece][op]


def _fit_group(run: Runner, spec: Spec, g: Group, label: str) -> GroupFit:
    shapes = g.fit + g.held
    measures = [run(s) for s in shapes]
    n_pieces = len(measures[0])
    flops: list[IPoly] = []
    live: list[list[IPoly | None]] = []
    where = f"{label} {spec.model} ({spec.variant}, {g.name})"
    for p in range(n_pieces):
        name = measures[0][p].name
        ops = measures[0][p].ops
        for s, m in zip(shapes, measures, strict=True):
            if m[p].ops != ops:
                i = next((k for k, (a, b) in enumerate(zip(ops, m[p].ops, strict=False)) if a != b),
                         min(len(ops), len(m[p].ops)))
                raise ValueError(f"{where} {name}: the op sequence changes with the shape at op {i} "
                                 f"({ops[i:i + 1]} vs {m[p].ops[i:i + 1]} at {s}); cannot fit per op")
        fit_m = [m[p] for m in measures[: len(g.fit)]]
        f = fit_exact(g.basis, g.fit, np.array([[m.flops] for m in fit_m]))[0]
        if f is None:
            raise ValueError(f"{where} {name}: FLOPs are not an integer polynomial in "
                             f"{[mono_text(x) for x in g.basis]}")
        flops.append(f)
        lv = fit_exact(g.basis, g.fit, np.array([m.live for m in fit_m])) if ops else []
        for s, m in zip(g.fit, fit_m, strict=True):
            fitted = [m.live[i] for i, q in enumerate(lv) if q is not None]
            if m.working_bytes != max(fitted, default=0):
                raise ValueError(f"{where} {name}: the peak at {s} is at an op whose live bytes are not a "
                                 f"polynomial in {[mono_text(x) for x in g.basis]}")
        live.append(lv)
    return GroupFit(shapes, len(g.fit), measures, flops, live)


def _align(a: Sequence[str], b: Sequence[str]) -> list[int]:
    """For each op of ``a``, an op of ``b``: its aligned twin, or the last aligned op before it (or 0)."""
    out = [0] * len(a)
    twin: dict[int, int] = {}
    for blk in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks():
        for k in range(blk.size):
            twin[blk.a + k] = blk.b + k
    last = 0
    for i in range(len(a)):
        last = twin.get(i, last)
        out[i] = last
    return out


def _join(spec: Spec, p0: IPoly | None, p1: IPoly | None) -> IPoly | None:
    if len(spec.groups) == 1:
        return p0
    if p0 is None or p1 is None:
        return None
    return poly_add(p0, poly_mul(spec.selector, poly_add(p1, p0, -1)))


def _peak_candidates(g: Group, gf: GroupFit, piece: int) -> set[int]:
    """Ops that are (within float rounding) the largest at some measured or grid shape of the group."""
    polys = gf.live[piece]
    if not polys:
        return set()
    coef = np.full((len(g.basis), len(polys)), np.nan)
    for i, q in enumerate(polys):
        if q is not None:
            coef[:, i] = [q.get(m, 0) for m in g.basis]
    values = design(g.basis, gf.shapes + g.grid) @ np.nan_to_num(coef)
    values[:, np.isnan(coef[0])] = -np.inf
    top = values.max(axis=1, keepdims=True)
    rows, cols = np.nonzero(values >= top - np.abs(top) * 1e-9)
    return {int(c) for c in cols}


def _working_bytes(spec: Spec, fits: list[GroupFit], piece: int) -> list[IPoly]:
    """The per-op polynomials, joined across groups, that are the exact max at some shape."""
    ops = [gf.measures[0][piece].ops for gf in fits]
    twin = [_align(ops[k], ops[1 - k]) for k in range(len(fits))] if len(fits) == 2 else []
    cands: dict[tuple, IPoly] = {}
    for k, (g, gf) in enumerate(zip(spec.groups, fits, strict=True)):
        for i in sorted(_peak_candidates(g, gf, piece)):
            if len(fits) == 1:
                q = gf.live[piece][i]
            else:
                other = fits[1 - k].live[piece][twin[k][i]]
                q = _join(spec, *((gf.live[piece][i], other) if k == 0 else (other, gf.live[piece][i])))
            if q is not None:
                cands.setdefault(poly_key(q), q)
    ordered = [cands[key] for key in sorted(cands)]
    keep: dict[tuple, IPoly] = {}
    for g, gf in zip(spec.groups, fits, strict=True):
        for s in gf.shapes + g.grid:
            vals = [poly_value(q, s) for q in ordered]
            best = ordered[int(np.argmax(vals))] if vals else {}
            keep.setdefault(poly_key(best), best)
    return [keep[key] for key in sorted(keep)] or [{}]


@dataclass(frozen=True)
class FittedExec:
    """One piece's exec cost for one variant, with the polynomials still in integer form."""

    flops: IPoly
    working: list[IPoly]

    def cost(self) -> ExecCost:
        return ExecCost(flops=to_poly(self.flops), working_bytes=to_max_poly(self.working))


def fit_spec(run: Runner, spec: Spec, label: str = "") -> tuple[list[FittedExec], int]:
    """Measure (``run(shape)`` -> one measure per piece), fit and verify one model variant: per piece its exec
    cost, and how many held-out shapes were checked. Raises ValueError, naming ``label``, the model, the piece
    and the shape, when anything is not exact."""
    fits = [_fit_group(run, spec, g, label) for g in spec.groups]
    n_pieces = len(fits[0].flops)
    out: list[FittedExec] = []
    for p in range(n_pieces):
        flops = _join(spec, fits[0].flops[p], fits[-1].flops[p])
        assert flops is not None
        out.append(FittedExec(flops, _working_bytes(spec, fits, p)))
    verified = 0
    for gf in fits:
        for si, s in enumerate(gf.shapes):
            for p, fe in enumerate(out):
                m = gf.measures[si][p]
                got_f, got_w = poly_value(fe.flops, s), max(poly_value(q, s) for q in fe.working)
                if (got_f, got_w) != (m.flops, m.working_bytes):
                    raise ValueError(
                        f"{label} {spec.model} ({spec.variant}) {m.name} at {s}: fitted "
                        f"FLOPs {got_f} / working bytes {got_w}, measured {m.flops} / {m.working_bytes}; "
                        f"FLOPs = {poly_text(fe.flops)}")
            verified += si >= gf.n_fit
    return out, verified
