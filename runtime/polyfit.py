"""Integer polynomials in the shape variables, and their exact fit from measurements.

FLOPs and live bytes of a block are integer polynomials in the shape variables (B, L, S, T, M, P, F, H, W):
every tensor's size is a product of them. ``fit_exact`` recovers the coefficients from measurements at a few
small shapes by least squares, rounds them to integers and keeps only fits that reproduce every measurement
exactly (integer equality). Anything else is reported as not representable in the basis (``None``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from cidl.scheduler.costmodel import MaxPoly, Poly, Term

VARS = ("B", "L", "S", "T", "M", "P", "F", "H", "W")
Mono = tuple[tuple[str, int], ...]  # (var, exponent) pairs in VARS order; () is the constant
IPoly = dict[Mono, int]
Shape = Mapping[str, int]


def mono(text: str) -> Mono:
    """``"B*S^2*T"`` -> ``(("B", 1), ("S", 2), ("T", 1))``; ``"1"`` -> ``()``."""
    exps: dict[str, int] = {}
    for factor in text.replace(" ", "").split("*"):
        if factor == "1":
            continue
        var, _, exp = factor.partition("^")
        if var not in VARS:
            raise ValueError(f"monomial {text!r}: unknown shape variable {var!r} (expected one of {VARS})")
        exps[var] = exps.get(var, 0) + (int(exp) if exp else 1)
    return tuple((v, exps[v]) for v in VARS if exps.get(v))


def mono_text(m: Mono) -> str:
    return "*".join(v if e == 1 else f"{v}^{e}" for v, e in m) or "1"


def mono_value(m: Mono, shape: Shape) -> int:
    value = 1
    for var, exp in m:
        value *= shape[var] ** exp
    return value


def poly_value(p: IPoly, shape: Shape) -> int:
    return sum(c * mono_value(m, shape) for m, c in p.items())


def poly_add(a: IPoly, b: IPoly, k: int = 1) -> IPoly:
    """``a + k*b`` without zero terms."""
    out = dict(a)
    for m, c in b.items():
        out[m] = out.get(m, 0) + k * c
    return {m: c for m, c in out.items() if c}


def poly_mul(a: IPoly, b: IPoly) -> IPoly:
    out: IPoly = {}
    for ma, ca in a.items():
        for mb, cb in b.items():
            exps = dict(ma)
            for v, e in mb:
                exps[v] = exps.get(v, 0) + e
            m = tuple((v, exps[v]) for v in VARS if exps.get(v))
            out[m] = out.get(m, 0) + ca * cb
    return {m: c for m, c in out.items() if c}


def poly_key(p: IPoly) -> tuple[tuple[Mono, int], ...]:
    """A canonical, hashable form (terms by total degree, highest first, then variable order)."""
    return tuple(sorted(p.items(), key=lambda mc: (-sum(e for _, e in mc[0]), _order(mc[0]))))


def _order(m: Mono) -> tuple[int, ...]:
    exps = dict(m)
    return tuple(-exps.get(v, 0) for v in VARS)


def to_poly(p: IPoly) -> Poly:
    return Poly(terms=[Term(coef=c, exps=dict(m)) for m, c in poly_key(p)])


def to_max_poly(ps: Sequence[IPoly]) -> MaxPoly:
    return MaxPoly(pieces=[to_poly(p) for p in ps])


def poly_text(p: IPoly) -> str:
    return " + ".join(f"{c}*{mono_text(m)}" for m, c in poly_key(p)) or "0"


def design(basis: Sequence[Mono], shapes: Sequence[Shape]) -> np.ndarray:
    return np.array([[mono_value(m, s) for m in basis] for s in shapes], dtype=np.float64)


def identifiable(basis: Sequence[Mono], shapes: Sequence[Shape]) -> bool:
    """Whether the shapes determine every coefficient of the basis (full column rank)."""
    a = design(basis, shapes)
    a = a / np.abs(a).max(axis=0)
    return bool(np.linalg.matrix_rank(a) == len(basis))


def fit_exact(basis: Sequence[Mono], shapes: Sequence[Shape], values: np.ndarray) -> list[IPoly | None]:
    """Fit one polynomial per column of ``values`` (``[len(shapes), n]`` integers) over ``basis``.

    Returns, per column, the integer polynomial that reproduces every value exactly, or ``None`` when the
    least-squares solution rounded to integers does not (the quantity is not a polynomial in this basis).
    """
    if not identifiable(basis, shapes):
        names = [mono_text(m) for m in basis]
        raise ValueError(f"basis {names} is not identifiable from {len(shapes)} shapes")
    values = np.asarray(values, dtype=np.int64)
    a = design(basis, shapes)
    scale = np.abs(a).max(axis=0)
    coef = np.linalg.lstsq(a / scale, values.astype(np.float64), rcond=None)[0] / scale[:, None]
    rounded = np.rint(coef)
    a_int = np.array([[mono_value(m, s) for m in basis] for s in shapes], dtype=object)
    c_int = rounded.astype(np.int64).astype(object)
    ok = (a_int.dot(c_int) == values.astype(object)).all(axis=0)
    out: list[IPoly | None] = []
    for j in range(values.shape[1]):
        if not ok[j]:
            out.append(None)
            continue
        out.append({m: int(c_int[i, j]) for i, m in enumerate(basis) if c_int[i, j] != 0})
    return out
