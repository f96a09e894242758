"""Synthetic H&E-like whole-slide images of known geometry: the demo data set and test fixtures.

Two layers:
  * `SlideSpec` + `render_slide` / `write_slide`: render ONE slide from explicit polygons
    (tissue lumps, annotated tumor, annotated exclusions, plus unannotated look-alikes, normal
    islands and lymphoid follicles). Tests elsewhere use this to build slides of known geometry.
  * `plan_slide`: random CAMELYON-style geometry for a wanted slide class (negative/itc/micro/
    macro), used by the demo-data stage.

Appearance is built in optical-density space (Beer-Lambert, typical H&E stain vectors), so
colours mix like stains do. As in real lymph-node metastases, tumor is told from normal tissue
by what a pathologist sees at ~1 um/px, not by colour at low resolution: normal tissue is dense
small round dark lymphocytes scattered at random; tumor is cohesive sheets of cells with large,
pleomorphic, vesicular nuclei (pale centre, dark rim, nucleoli) and eosinophilic cytoplasm. Both
are drawn over one shared "cellularity" field, and tumor's stains are calibrated per
cellularity so that the mean and spread of colour over 16-um blocks match (a colour-only probe
at 1/16 resolution is near chance: benchmarks/lowres_separability.py, docs/demo_data.md). The
mix of the two cell types follows a "tumor-likeness" field t in [0, 1] on a coarse (4 um)
grid. Single patches are ambiguous on purpose: tumor has mixed low-t areas and small
normal-looking islands (still labelled tumor); normal tissue has small isolated tumor-like
clusters and mildly atypical patches (labelled normal) and lymphoid follicles whose germinal
centres hold large pale tumor-like nuclei, so a model that sees the neighbourhood can beat a
patch classifier.

Speed: everything is vectorised; nuclei and cell bodies are stamped offset-by-offset (a loop
over stamp pixels, never over nuclei), textures are made on the coarse grid and upsampled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.path import Path as MplPath
from PIL import Image, ImageDraw
from scipy import ndimage

from pipeline.annotations import write_asap_xml
from pipeline.io import atomic_path
from pipeline.tiff import write_pyramidal_tiff

# Optical-density vectors of haematoxylin and eosin (unit length; typical Macenko estimates).
H_OD = np.array([0.5626, 0.7201, 0.4062])
E_OD = np.array([0.2159, 0.8012, 0.5581])
GLASS_OD = 0.035  # background glass / mounting medium: very light grey
H_MAX_OD = 3.0  # stain concentrations are quantised to uint8 over [0, *_MAX_OD]
E_MAX_OD = 1.5
COARSE_UM = 4.0  # grid of the tumor-likeness field and stroma textures

# CAMELYON17 slide classes from the largest metastasis' longest diameter (um).
MACRO_MIN_UM = 2000.0
MICRO_MIN_UM = 200.0


@dataclass(frozen=True)
class NucleusStyle:
    """Nuclei of one cell type: radius range (um), max aspect ratio, outline irregularity
    (relative radius modulation), vesicularity (0: solid dark chromatin; 1: pale centre, dark
    rim and nucleoli) and chromatin granularity (relative per-pixel variation)."""

    radius_um: tuple[float, float]
    aspect_max: float
    roughness: float
    vesicular: float
    grain: float


# Normal lymph node: small, round, uniform, dark lymphocytes, scattered at random.
# Metastasis: large pleomorphic vesicular nuclei with nucleoli, in cohesive sheets of cells with
# eosinophilic cytoplasm (a jittered hexagonal lattice, TUMOR_SPACING_UM apart).
LYMPHOCYTE = NucleusStyle((2.3, 3.2), 1.15, 0.03, 0.0, 0.25)
CARCINOMA = NucleusStyle((4.0, 7.0), 1.8, 0.12, 1.0, 0.5)
TUMOR_SPACING_UM = 15.0
CELL_RADIUS_UM = (6.0, 7.5)  # tumor cell body (cytoplasm) radius range

# Low-resolution colour is matched by construction: both tissue types are drawn from the SAME
# cellularity field c in [0, 1] (dense cortex vs pale sinus-like areas, independent of tumor),
# and at every c the haematoxylin / eosin of tumor (nuclear darkness, cytoplasm, background) is
# set so its mean colour over 16-um blocks equals that of lymphoid tissue at the same c; nest
# darkness and per-cell cytoplasm vary so that the spread of those blocks matches too (a regular
# sheet of cells varies less from block to block than randomly scattered lymphocytes). The
# constants were calibrated on homogeneous patches (least squares at c = 0 and 1; see
# docs/demo_data.md; tests/test_demo_data.py checks the match); what differs is only visible
# at ~1 um/px.
LYMPH_COVERAGE = (0.16, 0.42)  # nuclear area fraction of lymphoid tissue at c = 0 and 1
LYMPH_OD = 1.15  # haematoxylin OD of a lymphocyte nucleus (x U(0.9, 1.1) per nucleus)
NORMAL_BG = ((0.16, 0.60), (0.14, 0.50))  # normal background (H, E) OD at c = 0 and c = 1
TUMOR_OD = (0.891, 1.440)  # mean haematoxylin OD scale of tumor nuclei at c = 0 and 1
TUMOR_BG = ((0.075, 0.493), (0.125, 0.387))  # tumor background (H, E) OD at c = 0 and c = 1
TUMOR_CYTO_E = 0.20  # extra eosin OD inside tumor cell bodies (x U(CYTO_SPREAD) per cell)
CYTO_SPREAD = (0.3, 1.7)
TUMOR_PATCHINESS = (0.29, 0.18)  # tumor nuclear-darkness variation over ~16 um at c = 0 and 1
GERMINAL_MIX = 0.35  # follicles: fraction of large pale centroblast-like (tumor-like) nuclei


@dataclass(frozen=True, eq=False)
class SlideSpec:
    """Geometry of one synthetic slide. Polygons are (K, 2) float arrays of level-0 x, y px.

    tumor / exclusions are what the annotation file holds (ASAP groups _0 / _2); lookalikes
    (tumor-like clusters in normal tissue), normal_islands (normal-looking spots inside tumor,
    still tumor by annotation) and follicles (dense lymphoid aggregates) are only rendered.
    """

    width_px: int
    height_px: int
    mpp: float
    seed: int
    tissue: tuple[np.ndarray, ...]
    tumor: tuple[np.ndarray, ...] = ()
    exclusions: tuple[np.ndarray, ...] = ()
    lookalikes: tuple[np.ndarray, ...] = ()
    normal_islands: tuple[np.ndarray, ...] = ()
    follicles: tuple[np.ndarray, ...] = ()
    stain_scale: tuple[float, float] = (1.0, 1.0)  # per-slide H, E intensity (stain variation)
    meta: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------- geometry
def blob_polygon(
    center_xy: Sequence[float],
    radii_xy: Sequence[float],
    angle_rad: float,
    roughness: float,
    rng: np.random.Generator,
    n_vertices: int = 96,
) -> np.ndarray:
    """An irregular blob: an ellipse whose radius is modulated by random low harmonics
    (k = 2..6, total relative amplitude <= `roughness`), rotated by `angle_rad`."""
    theta = np.linspace(0.0, 2 * np.pi, n_vertices, endpoint=False)
    ks = np.arange(2, 7)
    amp = rng.random(ks.size) / ks
    amp *= roughness / max(amp.sum(), 1e-12)
    phase = rng.uniform(0, 2 * np.pi, ks.size)
    mod = 1.0 + (amp[:, None] * np.cos(ks[:, None] * theta[None] + phase[:, None])).sum(0)
    x = radii_xy[0] * mod * np.cos(theta)
    y = radii_xy[1] * mod * np.sin(theta)
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    return np.stack([center_xy[0] + c * x - s * y, center_xy[1] + s * x + c * y], axis=1)


def longest_diameter(poly: np.ndarray) -> float:
    """Largest distance between two vertices of a polygon (same units as the vertices)."""
    p = np.asarray(poly, dtype=float)
    d = p[:, None, :] - p[None, :, :]
    return float(np.sqrt((d**2).sum(-1)).max())


def slide_label(tumor_polygons: Sequence[np.ndarray], mpp: float) -> str:
    """CAMELYON17 slide class from the largest tumor's longest diameter: > 2000 um macro,
    > 200 um micro, else itc; no tumor polygons: negative."""
    if len(tumor_polygons) == 0:
        return "negative"
    d_um = max(longest_diameter(p) for p in tumor_polygons) * mpp
    return "macro" if d_um > MACRO_MIN_UM else "micro" if d_um > MICRO_MIN_UM else "itc"


def _scaled(poly: np.ndarray, factor: float) -> np.ndarray:
    c = poly.mean(0)
    return c + (poly - c) * factor


def _radius(poly: np.ndarray) -> float:
    return float(np.sqrt(((poly - poly.mean(0)) ** 2).sum(1)).max())


def _place(
    rng: np.random.Generator,
    container: np.ndarray,
    diameter: float,
    aspect_max: float,
    roughness: float,
    margin: float,
    avoid: Sequence[tuple[np.ndarray, float]] = (),
    tries: int = 300,
    n_vertices: int = 96,
) -> np.ndarray | None:
    """Random blob of longest diameter `diameter` lying inside `container` with `margin` to
    spare, and with its circumcircle >= gap away from each (center, radius + gap) in `avoid`.
    None when no position was found in `tries` attempts."""
    lo, hi = container.min(0), container.max(0)
    path = MplPath(container)
    for _ in range(tries):
        center = rng.uniform(lo, hi)
        # cheap rejects before building the blob (its circumradius is >= diameter / 2)
        if not path.contains_point(center) or any(
            np.hypot(*(center - c)) < diameter / 2 + rc for c, rc in avoid
        ):
            continue
        aspect = rng.uniform(1.0, aspect_max)
        shape = blob_polygon((0, 0), (aspect, 1.0), rng.uniform(0, np.pi), roughness, rng,
                             n_vertices)
        shape *= diameter / longest_diameter(shape)
        poly = shape + center
        r = _radius(poly)
        if any(np.hypot(*(poly.mean(0) - c)) < r + rc for c, rc in avoid):
            continue
        if path.contains_points(_scaled(poly, 1 + margin / max(r, 1e-9))).all():
            return poly
    return None


def _lump_cells(rng: np.random.Generator, n: int, side: float, big_first: bool) -> list:
    """Split the square slide into n strips (x0, y0, w, h), one tissue lump per strip."""
    if n == 1:
        fr = np.array([1.0])
    elif big_first:
        fr = np.array([0.62] + [0.38 / (n - 1)] * (n - 1))
    else:
        fr = rng.dirichlet(np.full(n, 8.0))
        fr = np.maximum(fr, 0.22)
        fr /= fr.sum()
    fr = fr[rng.permutation(n)] if not big_first else fr
    edges = np.concatenate([[0], np.cumsum(fr)]) * side
    vertical = rng.random() < 0.5
    return [(0.0, a, side, b - a) if vertical else (a, 0.0, b - a, side)
            for a, b in zip(edges[:-1], edges[1:], strict=True)]


def plan_slide(
    label: str,
    slide_um: float,
    mpp: float,
    rng: np.random.Generator,
) -> SlideSpec:
    """Random CAMELYON-style geometry aiming at slide class `label` (negative/itc/micro/macro).

    The class actually reached follows from the placed tumors (`slide_label(spec.tumor, mpp)`):
    a macro tumor that does not fit a small slide is shrunk until it fits.
    """
    if label not in ("negative", "itc", "micro", "macro"):
        raise ValueError(f"unknown slide label {label!r}")
    size_px = int(round(slide_um / mpp))
    um = 1.0 / mpp  # px per um
    # The parts are drawn in this order from the one `rng`: a slide is a function of its seed.
    lumps = _plan_lumps(label, size_px, rng)
    tumors = _plan_tumors(_tumor_targets_um(label, rng), lumps, um, rng)
    exclusions, islands = _plan_inside_tumors(tumors, um, rng)
    look = _plan_lookalikes(lumps, tumors, um, rng)
    follicles = _plan_follicles(lumps, um, rng)
    return SlideSpec(
        width_px=size_px,
        height_px=size_px,
        mpp=mpp,
        seed=int(rng.integers(2**63 - 1)),
        tissue=tuple(lumps),
        tumor=tuple(tumors),
        exclusions=tuple(exclusions),
        lookalikes=tuple(look),
        normal_islands=tuple(islands),
        follicles=tuple(follicles),
        stain_scale=(float(rng.uniform(0.88, 1.12)), float(rng.uniform(0.85, 1.15))),
        meta={"target_label": label},
    )


def _plan_lumps(label: str, side: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Tissue lumps: 1-3 blobs, each inside its own strip of the slide (never overlapping)."""
    n_lumps = int(rng.choice([1, 2], p=[0.5, 0.5]) if label == "macro"
                  else rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]))
    cells = _lump_cells(rng, n_lumps, side, big_first=(label == "macro" and n_lumps > 1))
    lumps = []
    for x0, y0, w, h in cells:
        # 0.41 semi-axis * (1 + 0.15 roughness) + 0.025 jitter < 0.5: stays inside its strip
        cx = x0 + w * (0.5 + rng.uniform(-0.025, 0.025))
        cy = y0 + h * (0.5 + rng.uniform(-0.025, 0.025))
        radii = (0.41 * w * rng.uniform(0.93, 1.0), 0.41 * h * rng.uniform(0.93, 1.0))
        lumps.append(blob_polygon((cx, cy), radii, 0.0, 0.15, rng, n_vertices=160))
    return lumps


def _tumor_targets_um(label: str, rng: np.random.Generator) -> list[float]:
    """Longest diameters (um) to aim at: the main tumor sets the class; satellites are smaller
    classes."""
    targets: list[float] = []
    if label == "macro":
        targets = [rng.uniform(2200, 2900)]
        targets += [rng.uniform(300, 900) if rng.random() < 0.6 else rng.uniform(80, 170)
                    for _ in range(rng.integers(0, 3))]
    elif label == "micro":
        targets = [rng.uniform(350, 1800)]
        targets += [rng.uniform(80, 170) for _ in range(rng.integers(0, 2))]
    elif label == "itc":
        targets = [rng.uniform(80, 170) for _ in range(rng.integers(1, 4))]
    return targets


def _plan_tumors(targets_um: Sequence[float], lumps: Sequence[np.ndarray], um: float,
                 rng: np.random.Generator) -> list[np.ndarray]:
    """Tumors of the target diameters: the first in the largest lump, the others in any; each
    shrunk until it fits (left out if it never does)."""
    areas = [float(np.ptp(p[:, 0]) * np.ptp(p[:, 1])) for p in lumps]
    main_lump = lumps[int(np.argmax(areas))]
    tumors: list[np.ndarray] = []
    for i, d_um in enumerate(targets_um):
        homes = [main_lump] if i == 0 else [lumps[j] for j in rng.permutation(len(lumps))]
        avoid = [(t.mean(0), _radius(t) + 200 * um) for t in tumors]
        poly = None
        # no blob fits wider than ~0.85 of its home: start there on small slides
        d = min(d_um * um, 0.85 * min(np.ptp(h, 0).min() for h in homes))
        for _ in range(8):  # shrink until it fits
            for home in homes:
                poly = _place(rng, home, d, 1.6, 0.25 if d_um > 250 else 0.15, 40 * um, avoid,
                              n_vertices=96 if d_um > 250 else 32)
                if poly is not None:
                    break
            if poly is not None:
                break
            d *= 0.88
        if poly is not None:
            tumors.append(poly)
    return tumors


def _plan_inside_tumors(tumors: Sequence[np.ndarray], um: float, rng: np.random.Generator,
                        ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(exclusions: annotated normal inside a tumor, normal-looking islands: not annotated), in
    tumors of 1000 um and more."""
    exclusions: list[np.ndarray] = []
    islands: list[np.ndarray] = []
    for t in tumors:
        d_um = longest_diameter(t) / um
        taken: list[tuple[np.ndarray, float]] = []
        n_exc = 0 if d_um < 1000 else int(rng.integers(1, 3) if d_um > 2000 else rng.integers(0, 2))
        for _ in range(n_exc):
            e = _place(rng, t, min(rng.uniform(350, 650), 0.35 * d_um) * um, 1.5, 0.2, 60 * um,
                       taken, tries=200, n_vertices=48)
            if e is not None:
                exclusions.append(e)
                taken.append((e.mean(0), _radius(e) + 150 * um))
        n_isl = 0 if d_um < 1000 else int(rng.integers(1, 5))
        for _ in range(n_isl):
            s = _place(rng, t, rng.uniform(200, 300) * um, 1.4, 0.15, 80 * um, taken, tries=200,
                       n_vertices=32)
            if s is not None:
                islands.append(s)
                taken.append((s.mean(0), _radius(s) + 150 * um))
    return exclusions, islands


def _plan_lookalikes(lumps: Sequence[np.ndarray], tumors: Sequence[np.ndarray], um: float,
                     rng: np.random.Generator) -> list[np.ndarray]:
    """Tumor-like look-alike clusters in normal tissue, isolated and about one tile big."""
    look: list[np.ndarray] = []
    avoid = [(t.mean(0), _radius(t) + 450 * um) for t in tumors]
    for _ in range(int(rng.integers(3, 8))):
        home = lumps[int(rng.integers(len(lumps)))]
        p = _place(rng, home, rng.uniform(180, 340) * um, 1.5, 0.2, 30 * um, avoid, tries=100,
                   n_vertices=32)
        if p is not None:
            look.append(p)
            avoid.append((p.mean(0), _radius(p) + 300 * um))
    return look


def _plan_follicles(lumps: Sequence[np.ndarray], um: float,
                    rng: np.random.Generator) -> list[np.ndarray]:
    """Lymphoid follicles: dense small dark nuclei anywhere in normal tissue."""
    follicles: list[np.ndarray] = []
    for home in lumps:
        for _ in range(int(rng.integers(1, 5))):
            p = _place(rng, home, rng.uniform(250, 600) * um, 1.3, 0.15, 20 * um, tries=50,
                       n_vertices=48)
            if p is not None:
                follicles.append(p)
    return follicles


# ---------------------------------------------------------------------------------- rendering
def _raster(polys: Sequence[np.ndarray], shape: tuple[int, int], scale: float,
            values: Sequence[int] | None = None) -> np.ndarray:
    """uint8 raster (0/255 or the given per-polygon values) of polygons in px / `scale`."""
    img = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(img)
    for i, p in enumerate(polys):
        pts = [(float(x), float(y)) for x, y in np.asarray(p) / scale]
        draw.polygon(pts, fill=255 if values is None else int(values[i]))
    return np.asarray(img)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Zero-mean, unit-std smooth noise of feature size ~`cell` grid px (made coarse, upsampled)."""
    cell = max(cell, 1.0)
    small = (max(2, int(np.ceil(shape[0] / cell)) + 2), max(2, int(np.ceil(shape[1] / cell)) + 2))
    n = ndimage.gaussian_filter(rng.standard_normal(small).astype(np.float32), 1.0)
    img = Image.fromarray(n, mode="F").resize((shape[1], shape[0]), Image.Resampling.BICUBIC)
    a = np.asarray(img, dtype=np.float32)
    return (a - a.mean()) / max(float(a.std()), 1e-6)


def _upsample_u8(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    img = Image.fromarray(a, mode="L").resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.asarray(img)


def _stain_lut(h_scale: float, e_scale: float) -> np.ndarray:
    """(65536, 3) uint8: RGB of quantised (H, E) concentrations, index = H << 8 | E."""
    h = np.arange(256) / 255.0 * H_MAX_OD * h_scale
    e = np.arange(256) / 255.0 * E_MAX_OD * e_scale
    od = h[:, None, None] * H_OD + e[None, :, None] * E_OD + GLASS_OD
    return np.clip(255.0 * np.exp(-od) + 0.5, 0, 255).astype(np.uint8).reshape(-1, 3)


def _nucleus_stamp(rng: np.random.Generator, style: NucleusStyle, mpp: float, q: float):
    """One nucleus stamp: (dy, dx, value) per stamp pixel, value ~[0, 1.3] x nuclear OD; its
    radius is at quantile `q` of style.radius_um.

    Solid nuclei (lymphocytes) are uniformly dark with fine grain; vesicular ones (carcinoma)
    have a pale centre, a dark ~1.3 um rim (chromatin on the membrane) and 1-2 nucleoli."""
    r = (style.radius_um[0] + q * (style.radius_um[1] - style.radius_um[0])) / mpp
    asp = rng.uniform(1.0, style.aspect_max)
    a, b = r * math.sqrt(asp), r / math.sqrt(asp)
    ang = rng.uniform(0, np.pi)
    half = int(math.ceil(a * (1 + style.roughness))) + 1
    dy, dx = np.mgrid[-half:half + 1, -half:half + 1]
    u = dx * math.cos(ang) + dy * math.sin(ang)
    v = -dx * math.sin(ang) + dy * math.cos(ang)
    theta = np.arctan2(v / b, u / a)
    ks = np.arange(2, 5)
    amp = rng.random(ks.size) * style.roughness / ks.size
    mod = 1 + (amp[:, None, None] * np.cos(ks[:, None, None] * theta
                                           + rng.uniform(0, 2 * np.pi, (ks.size, 1, 1)))).sum(0)
    d = np.sqrt((u / a) ** 2 + (v / b) ** 2) / mod  # 1 on the (irregular) outline
    edge = np.clip((1.0 - d) * min(a, b) + 0.5, 0.0, 1.0)  # ~1 px soft edge
    rim_w = 1.3 / mpp / min(a, b)  # rim width as a fraction of the radius
    rim = np.clip((d - (1 - rim_w)) / rim_w, 0.0, 1.0)
    inner = 1.0 - 0.62 * style.vesicular
    val = edge * (inner + (1 - inner) * rim)
    val *= 1 - style.grain / 2 + style.grain * rng.random(val.shape)  # chromatin granularity
    if style.vesicular > 0:
        for _ in range(int(rng.integers(1, 3))):  # nucleoli: dark dots ~1 um in radius
            c = rng.uniform(-0.45, 0.45, 2) * (a, b)
            nd = np.hypot(u - c[0], v - c[1]) * mpp
            val = np.maximum(val, 1.3 * np.clip(1.6 - nd, 0.0, 1.0))
    keep = val > 0.02
    return dy[keep], dx[keep], val[keep].astype(np.float32)


def _disc_stamp(radius_px: float):
    """A soft-edged disc: (dy, dx, value in [0, 1]) per stamp pixel."""
    half = int(math.ceil(radius_px)) + 1
    dy, dx = np.mgrid[-half:half + 1, -half:half + 1]
    val = np.clip(radius_px - np.hypot(dy, dx) + 0.5, 0.0, 1.0)
    keep = val > 0.02
    return dy[keep], dx[keep], val[keep].astype(np.float32)


def _mean_area_px(style: NucleusStyle, mpp: float) -> float:
    r = np.mean(style.radius_um) / mpp
    return math.pi * r * r


def _stamp_all(rng: np.random.Generator, canvas: np.ndarray, wp: int, centers: np.ndarray,
               bank: list, level: np.ndarray) -> None:
    """Max-composite stamps from `bank` (one drawn per centre) at flat `centers` of the padded
    `canvas` (row width `wp`), each scaled by its `level` (uint8 units). Loops over stamp
    pixels, never over nuclei; max, not sum: overlaps do not get darker than one nucleus."""
    sid = rng.integers(0, len(bank), centers.size)
    for s, (dy, dx, val) in enumerate(bank):
        sel = sid == s
        if not sel.any():
            continue
        # unique: one write per px per offset (a duplicate centre keeps one level)
        c, first = np.unique(centers[sel], return_index=True)
        q = level[sel][first]
        for oy, ox, v in zip(dy, dx, val, strict=True):
            idx = c + (oy * wp + ox)
            canvas[idx] = np.maximum(canvas[idx], np.minimum(v * q, 255).astype(np.uint8))


def _lattice(rng: np.random.Generator, H: int, W: int, s: float) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) int px of a jittered hexagonal lattice of spacing `s` px over an H x W image, at
    a random angle and offset (an axis-aligned lattice would beat with the tile grid)."""
    half = math.hypot(H, W) / 2 + s
    rows, cols = np.mgrid[-half:half:s * 0.866, -half:half:s]
    jitter = rng.uniform(-0.25, 0.25, (2, *rows.shape)) * s
    ly = rows + jitter[0]
    lx = cols + 0.5 * s * (np.round(rows / (s * 0.866)) % 2) + jitter[1]
    a = rng.uniform(0, np.pi / 3)
    y = H / 2 + ly * math.cos(a) + lx * math.sin(a) + rng.uniform(0, s)
    x = W / 2 - ly * math.sin(a) + lx * math.cos(a) + rng.uniform(0, s)
    inside = (y >= 0) & (y < H) & (x >= 0) & (x < W)
    return y[inside].astype(np.int64), x[inside].astype(np.int64)


def _lerp(pair: tuple[float, float], c: np.ndarray) -> np.ndarray:
    return pair[0] + (pair[1] - pair[0]) * c


def _fields(spec: SlideSpec, rng: np.random.Generator, lo_shape: tuple[int, int], f: int):
    """Coarse (COARSE_UM) fields: tumor-likeness t (the nuclear type mix), cellularity c,
    follicle (germinal centre) weight, capsule mask and tissue mask."""
    lo_um = f * spec.mpp

    def coarse(polys, values=None):
        return _raster(polys, lo_shape, f, values).astype(np.float32) / 255.0

    tumor = coarse(spec.tumor) * (1 - coarse(spec.exclusions)) * (1 - coarse(spec.normal_islands))
    dips = np.clip(_smooth_noise(rng, lo_shape, 150 / lo_um) - 0.5, 0, 1.5) / 1.5
    t = tumor * (1.0 - 0.45 * dips)  # mixed, less tumor-like areas inside tumor
    look_levels = rng.uniform(0.8, 1.0, len(spec.lookalikes)) * 255
    t = np.maximum(t, coarse(spec.lookalikes, look_levels))
    t = ndimage.gaussian_filter(t, 6 / lo_um)
    bumps = np.clip(_smooth_noise(rng, lo_shape, 120 / lo_um) - 1.0, 0, 1)
    t = np.clip(np.maximum(t, 0.3 * bumps), 0, 1)  # mildly atypical patches in normal tissue
    fol = ndimage.gaussian_filter(coarse(spec.follicles), 15 / lo_um) * (1 - t)
    # cellularity: the same field under tumor and normal tissue, so it carries no label
    # (the 24-60 um terms vary colour within a tile alike in both types, so what little the
    # cell arrangements add to the spread of 16 um blocks is lost in it)
    c = np.clip(0.5 + 0.25 * _smooth_noise(rng, lo_shape, 300 / lo_um)
                + 0.16 * _smooth_noise(rng, lo_shape, 60 / lo_um)
                + 0.1 * _smooth_noise(rng, lo_shape, 24 / lo_um), 0, 1)
    tissue_lo = coarse(spec.tissue) > 0.5
    capsule = tissue_lo & ~ndimage.binary_erosion(tissue_lo, iterations=max(1, round(15 / lo_um)))
    # germinal centres: some large pale nuclei among the lymphocytes (a tumor look-alike)
    t_nuc = np.maximum(t, GERMINAL_MIX * fol)
    return t, t_nuc, c, capsule


def render_slide(spec: SlideSpec) -> np.ndarray:
    """Render `spec` to an (H, W, 3) uint8 RGB image; deterministic given spec.seed."""
    rng = np.random.default_rng(spec.seed)
    H, W, mpp = spec.height_px, spec.width_px, spec.mpp
    f = max(1, int(round(COARSE_UM / mpp)))  # full-res px per coarse px
    lo_shape = (-(-H // f), -(-W // f))
    t, t_nuc, c, capsule = _fields(spec, rng, lo_shape, f)
    return _compose(spec, rng, t, t_nuc, c, capsule, f)


def _compose(spec: SlideSpec, rng: np.random.Generator, t: np.ndarray, t_nuc: np.ndarray,
             c: np.ndarray, capsule: np.ndarray, f: int) -> np.ndarray:
    """Pixels from the coarse fields: background stains, nuclei, tumor cytoplasm, grain."""
    H, W, mpp = spec.height_px, spec.width_px, spec.mpp
    lo_shape = c.shape
    # -- background H / E (coarse, textured), mixed between the two tissue types by t
    tex = _smooth_noise(rng, lo_shape, 2.0)
    h_bg = (1 - t) * _lerp((NORMAL_BG[0][0], NORMAL_BG[1][0]), c) \
        + t * _lerp((TUMOR_BG[0][0], TUMOR_BG[1][0]), c)
    e_bg = (1 - t) * _lerp((NORMAL_BG[0][1], NORMAL_BG[1][1]), c) \
        + t * _lerp((TUMOR_BG[0][1], TUMOR_BG[1][1]), c)
    h_bg = h_bg * (1 + 0.08 * _smooth_noise(rng, lo_shape, 3.0))
    e_bg = e_bg * (1 + 0.16 * tex) + 0.25 * capsule
    hq = _upsample_u8(np.clip(h_bg / H_MAX_OD * 255, 0, 255).astype(np.uint8), (H, W))
    eq = _upsample_u8(np.clip(e_bg / E_MAX_OD * 255, 0, 255).astype(np.uint8), (H, W))
    tissue = _raster(spec.tissue, (H, W), 1.0) > 0

    # -- lymphocytes: inhomogeneous Poisson process by thinning (density from c and 1 - t)
    lam_per_cov = 1.0 / _mean_area_px(LYMPHOCYTE, mpp)
    lam_max = lam_per_cov * LYMPH_COVERAGE[1]
    n_cand = int(rng.poisson(lam_max * H * W))
    ys, xs, u = rng.integers(0, H, n_cand), rng.integers(0, W, n_cand), rng.random(n_cand)
    keep = tissue[ys, xs]
    ys, xs, u = ys[keep], xs[keep], u[keep]
    ty, tx = ys // f, xs // f
    lam = lam_per_cov * _lerp(LYMPH_COVERAGE, c[ty, tx]) * (1 - t_nuc[ty, tx]) \
        * (1 - 0.7 * capsule[ty, tx])
    keep = u * lam_max < lam
    ly, lx = ys[keep], xs[keep]

    # -- tumor cells: a jittered hexagonal lattice (cohesive sheets), kept with probability t
    ty_, tx_ = _lattice(rng, H, W, TUMOR_SPACING_UM / mpp)
    u = rng.random(ty_.size)
    keep = tissue[ty_, tx_] & (u < t_nuc[ty_ // f, tx_ // f])
    ty_, tx_ = ty_[keep], tx_[keep]

    # stratified radii: every slide's stamp bank has the same mean nuclear area (the low-res
    # colour match would otherwise drift by a few grey levels per slide)
    banks = ([_nucleus_stamp(rng, LYMPHOCYTE, mpp, (k + rng.random()) / 12) for k in range(12)],
             [_nucleus_stamp(rng, CARCINOMA, mpp, (k + rng.random()) / 24) for k in range(24)],
             [_disc_stamp(rng.uniform(*CELL_RADIUS_UM) / mpp) for _ in range(4)])
    pad = 2 + max(int(np.abs(dy).max()) for bank in banks for dy, _, _ in bank)
    wp = W + 2 * pad
    nuc = np.zeros((H + 2 * pad) * wp, dtype=np.uint8)
    cyto = np.zeros_like(nuc)
    lq = LYMPH_OD * rng.uniform(0.9, 1.1, ly.size) * (255 / H_MAX_OD)
    _stamp_all(rng, nuc, wp, (ly + pad) * wp + (lx + pad), banks[0], lq.astype(np.float32))
    tc = (ty_ + pad) * wp + (tx_ + pad)
    nests = _smooth_noise(rng, lo_shape, 16 / (f * mpp))[ty_ // f, tx_ // f]
    tq = _lerp(TUMOR_OD, c[ty_ // f, tx_ // f]) * rng.uniform(0.75, 1.25, tc.size) \
        * np.clip(1 + _lerp(TUMOR_PATCHINESS, c[ty_ // f, tx_ // f]) * nests, 0.2, 2.0)
    _stamp_all(rng, nuc, wp, tc, banks[1], (tq * (255 / H_MAX_OD)).astype(np.float32))
    cq = (TUMOR_CYTO_E * 255 / E_MAX_OD * rng.uniform(*CYTO_SPREAD, tc.size)).astype(np.float32)
    _stamp_all(rng, cyto, wp, tc, banks[2], cq)
    nuc = nuc.reshape(H + 2 * pad, wp)[pad:pad + H, pad:pad + W]
    cyto = cyto.reshape(H + 2 * pad, wp)[pad:pad + H, pad:pad + W]

    # -- compose in quantised concentration space, then one LUT lookup to RGB
    grain = rng.integers(0, 13, (H, W), dtype=np.uint8)
    h = hq.astype(np.int16)
    h += nuc
    h += grain
    h -= 6
    # nuclei displace eosin; uint16 holds 255 * 256 (int16 would overflow)
    e = eq.astype(np.uint16) + cyto
    e = ((e * (256 - (nuc.astype(np.uint16) * 3 >> 2))) >> 8).astype(np.int16)
    e += grain[::-1]
    e -= 6
    h = np.where(tissue, h, grain >> 2)  # glass: faint grain only
    e = np.where(tissue, e, grain[:, ::-1] >> 2)
    np.clip(h, 0, 255, out=h)
    np.clip(e, 0, 255, out=e)
    idx = (h.astype(np.uint16) << 8) | e.astype(np.uint16)
    return _stain_lut(*spec.stain_scale)[idx]


def n_levels_for(size_px: int, min_px: int = 256) -> int:
    """Pyramid depth: halve until the smallest level is about `min_px`, but at least 3 levels."""
    return max(3, 1 + int(math.floor(math.log2(max(size_px, 1) / min_px))))


def write_slide(
    spec: SlideSpec,
    slide_path: str | Path,
    annotation_path: str | Path | None = None,
    jpeg_quality: int = 85,
) -> np.ndarray:
    """Render `spec`, write it as a pyramidal tiled TIFF (atomically) and, when
    `annotation_path` is given, its tumor / exclusion polygons as ASAP XML. Returns the RGB."""
    rgb = render_slide(spec)
    with atomic_path(slide_path) as tmp:
        write_pyramidal_tiff(tmp, rgb, spec.mpp,
                             n_levels=n_levels_for(min(spec.width_px, spec.height_px)),
                             jpeg_quality=jpeg_quality)
    if annotation_path is not None:
        write_asap_xml(annotation_path, spec.tumor, spec.exclusions)
    return rgb
