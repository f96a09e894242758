"""Tile masks -> polygons, exactly: the outline of the union of a grid mask's tile squares.

Grid-vertex units: vertex (x, y) = (col, row) is the top-left corner of tile (row, col), so tile
(r, c) is the square [c, c + 1] x [r, r + 1]. `to_level0` maps vertices to level-0 px the way the
tile stage places tiles (corner = origin + rint(vertex * pitch)), so polygon corners are tile
corners and every predicted tile is covered exactly (pixel-exact squares, no smoothing).

How the outline is traced. Every side of a mask tile whose neighbour is not in the mask is a
directed edge with the tile on its right (y points down). Edges are chained into rings; where
two tiles touch only at a corner (a "pinch"), the walk turns right, around the tile it came
along, so each ring borders one 4-connected part. A ring that passes a vertex twice (the
background pinches) is split there into simple loops. Positive-area loops are outlines
(exteriors), negative ones holes; each loop borders one 4-connected part, which has exactly one
exterior. The result is OGC-valid: simple rings; holes touch their exterior or each other at
most at single points.

Regions (lesions) are 8-connected components, as in the CAMELYON evaluation; a region whose
tiles touch only diagonally gives one polygon per 4-connected part (`GridPolygon.region` says
which region a part belongs to).

ASAP XML has no holes: a hole is written as an exclusion polygon (group `_2`) that readers
subtract from every tumor polygon, which would also erase an island of tumor inside the hole.
`asap_exclusions` therefore writes a hole that contains mask tiles as rectangles covering only
its background tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.draw import polygon as draw_polygon
from skimage.measure import label as sk_label

# Directions (dx, dy) of the four tile sides traced with the tile on the right (y down).
_RIGHT_TURN = {(1, 0): (0, 1), (0, 1): (-1, 0), (-1, 0): (0, -1), (0, -1): (1, 0)}


@dataclass(frozen=True)
class GridPolygon:
    """One 4-connected part of a mask, in grid-vertex units.

    exterior: (K, 2) int64 open ring of (x, y) vertices, corners only (no collinear points),
              starting at its smallest (y, x) vertex, tile interior on the right (y down).
    holes:    interior rings, same conventions.
    part:     4-connected component label of the part (1..), raster order.
    region:   8-connected component label the part belongs to (1..), raster order.
    """

    exterior: np.ndarray
    holes: tuple[np.ndarray, ...]
    part: int
    region: int


def ring_area(ring: np.ndarray) -> float:
    """Signed shoelace area of an open ring; > 0 when the interior is on the right (y down)."""
    x, y = np.asarray(ring, dtype=np.float64).T
    return float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y) / 2.0)


def _boundary_edges(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start (E, 2), end (E, 2), tile (E, 2) row/col) of every boundary side, as (x, y)."""
    m = np.pad(mask, 1)
    core = m[1:-1, 1:-1]
    starts, ends, tiles = [], [], []
    # (neighbour slice, start offset, end offset) per side, offsets as (dx, dy) from (c, r)
    sides = (
        (m[:-2, 1:-1], (0, 0), (1, 0)),  # top, going right
        (m[1:-1, 2:], (1, 0), (1, 1)),  # right, going down
        (m[2:, 1:-1], (1, 1), (0, 1)),  # bottom, going left
        (m[1:-1, :-2], (0, 1), (0, 0)),  # left, going up
    )
    for neighbour, s, e in sides:
        r, c = np.nonzero(core & ~neighbour)
        starts.append(np.stack([c + s[0], r + s[1]], axis=1))
        ends.append(np.stack([c + e[0], r + e[1]], axis=1))
        tiles.append(np.stack([r, c], axis=1))
    return (np.concatenate(starts).astype(np.int64), np.concatenate(ends).astype(np.int64),
            np.concatenate(tiles).astype(np.int64))


def _split_loops(walk: list[tuple[tuple[int, int], tuple[int, int]]]):
    """Split a closed walk [(vertex, tile right of the edge leaving it), ...] at repeated
    vertices into simple loops (each a list of the same pairs)."""
    path: list[tuple[tuple[int, int], tuple[int, int]]] = []
    pos: dict[tuple[int, int], int] = {}
    loops = []
    for v, tile in [*walk, walk[0]]:
        if v in pos:
            i = pos[v]
            loops.append(path[i:])
            for u, _ in path[i + 1:]:
                del pos[u]
            path = path[:i]
        pos[v] = len(path)
        path.append((v, tile))
    return loops


def _corners(ring: np.ndarray) -> np.ndarray:
    """Drop collinear vertices and start at the smallest (y, x) vertex."""
    d_in = ring - np.roll(ring, 1, axis=0)
    d_out = np.roll(ring, -1, axis=0) - ring
    keep = (d_in[:, 0] * d_out[:, 1] - d_in[:, 1] * d_out[:, 0]) != 0
    ring = ring[keep]
    start = int(np.lexsort((ring[:, 0], ring[:, 1]))[0])
    return np.roll(ring, -start, axis=0)


def trace_rings(mask: np.ndarray) -> list[tuple[np.ndarray, tuple[int, int]]]:
    """Simple rings of the mask outline: [(ring (K, 2) int64 (x, y) corners, a tile (row, col)
    on the ring's inner side), ...]. Exteriors have positive `ring_area`, holes negative."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"trace_rings: need a 2-D mask, got shape {mask.shape}")
    start, end, tile = _boundary_edges(mask)
    out_edges: dict[tuple[int, int], list[int]] = {}
    for i, (x, y) in enumerate(start.tolist()):
        out_edges.setdefault((x, y), []).append(i)
    used = np.zeros(len(start), dtype=bool)
    rings = []
    for first in range(len(start)):
        if used[first]:
            continue
        walk = []
        e = first
        # The turn rule pairs each incoming edge with one outgoing edge at every vertex (a
        # permutation of the edges), so the walk comes back to `first`.
        while not used[e]:
            used[e] = True
            walk.append((tuple(start[e].tolist()), tuple(tile[e].tolist())))
            cand = out_edges[tuple(end[e].tolist())]
            if len(cand) > 1:  # a pinch: turn right, around the tile we came along
                turn = _RIGHT_TURN[tuple((end[e] - start[e]).tolist())]
                cand = [k for k in cand if tuple((end[k] - start[k]).tolist()) == turn]
            e = cand[0]
        if e != first:
            raise RuntimeError("vectorize: boundary walk did not close")
        for loop in _split_loops(walk):
            ring = np.array([v for v, _ in loop], dtype=np.int64)
            rings.append((_corners(ring), loop[0][1]))
    return rings


def mask_polygons(mask: np.ndarray) -> tuple[list[GridPolygon], np.ndarray]:
    """Polygons (grid-vertex units) of the mask's 4-connected parts, sorted by (region, part),
    and the (H, W) int32 8-connected region labels (0 = not in the mask)."""
    mask = np.asarray(mask, dtype=bool)
    parts = sk_label(mask, connectivity=1)
    regions = sk_label(mask, connectivity=2).astype(np.int32)
    exteriors: dict[int, np.ndarray] = {}
    holes: dict[int, list[np.ndarray]] = {}
    for ring, (r, c) in trace_rings(mask):
        part = int(parts[r, c])
        if ring_area(ring) > 0:
            if part in exteriors:  # cannot happen for a 4-connected part; guard the invariant
                raise RuntimeError(f"vectorize: part {part} has two exteriors")
            exteriors[part] = ring
        else:
            holes.setdefault(part, []).append(ring)
    labels, first = np.unique(parts.ravel(), return_index=True)
    region_of = dict(zip(labels.tolist(), regions.ravel()[first].tolist(), strict=True))
    polys = []
    for part, ext in exteriors.items():
        hs = sorted(holes.get(part, []), key=lambda h: (int(h[0, 1]), int(h[0, 0])))
        polys.append(GridPolygon(ext, tuple(hs), part, int(region_of[part])))
    if len(polys) != int(parts.max(initial=0)):
        raise RuntimeError("vectorize: a 4-connected part has no exterior ring")
    polys.sort(key=lambda p: (p.region, p.part))
    return polys, regions


def rasterize_grid(rings: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: tiles whose centres lie inside any of the rings (grid-vertex units)."""
    out = np.zeros(shape, dtype=bool)
    for ring in rings:
        ring = np.asarray(ring, dtype=np.float64)
        rr, cc = draw_polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, shape=shape)
        out[rr, cc] = True
    return out


def polygons_to_mask(polygons: list[GridPolygon], shape: tuple[int, int]) -> np.ndarray:
    """The tiles the polygons cover (exteriors minus their holes): the inverse of
    `mask_polygons`, for checks."""
    out = np.zeros(shape, dtype=bool)
    for p in polygons:
        out |= rasterize_grid([p.exterior], shape) & ~rasterize_grid(list(p.holes), shape)
    return out


def rectangles(mask: np.ndarray) -> list[np.ndarray]:
    """Cover a tile mask exactly with disjoint axis-aligned rectangles (row runs merged down
    identical runs); each an open ring of its 4 corners in grid-vertex units."""
    mask = np.asarray(mask, dtype=bool)
    h = mask.shape[0]
    rects: list[tuple[int, int, int, int]] = []
    open_runs: dict[tuple[int, int], int] = {}  # (c0, c1) -> first row
    for r in range(h + 1):
        runs: set[tuple[int, int]] = set()
        if r < h:
            d = np.diff(np.concatenate([[0], mask[r].astype(np.int8), [0]]))
            runs = set(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist(),
                           strict=True))
        for key in sorted(set(open_runs) - runs):
            rects.append((open_runs.pop(key), r, *key))
        for key in sorted(runs - set(open_runs)):
            open_runs[key] = r
    return [np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1]], dtype=np.int64)
            for r0, r1, c0, c1 in sorted(rects)]


def asap_exclusions(polygons: list[GridPolygon], mask: np.ndarray) -> list[np.ndarray]:
    """Exclusion rings (grid-vertex units) for a hole-less format (ASAP `_2`): every hole as
    is, except a hole with mask tiles inside (an island), which becomes rectangles over its
    non-mask tiles, so that union(exteriors) minus union(exclusions) is exactly the mask."""
    mask = np.asarray(mask, dtype=bool)
    out = []
    for p in polygons:
        for hole in p.holes:
            inside = rasterize_grid([hole], mask.shape)
            if (inside & mask).any():
                out.extend(rectangles(inside & ~mask))
            else:
                out.append(hole)
    return out


def to_level0(ring: np.ndarray, pitch_px_level0: float,
              origin_xy_px_level0: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Grid vertices -> level-0 px (x, y) float64: origin + rint(vertex * pitch), the tile
    stage's rounding of tile corners."""
    ring = np.asarray(ring, dtype=np.float64)
    return np.asarray(origin_xy_px_level0, dtype=np.float64) + np.rint(ring * pitch_px_level0)
