"""CAMELYON16-shaped synthetic slides: big, mostly glass, written tile by tile.

What a CAMELYON16 `.tif` looks like (REFERENCE.md) and what this writes:
  * generic tiled TIFF, JPEG tiles of TILE_PX = 512, level 0 at LEVEL0_MPP = 0.243 um/px
    (XResolution/YResolution in pixels per cm, which OpenSlide reports as `openslide.mpp-x`);
  * power-of-two levels until the longer side is below TOP_LEVEL_MAX_PX (9-10 levels for
    50-130k px wide slides);
  * mostly glass with one to three lymph-node-like tissue lumps; tumor inside the first lump;
  * ASAP XML in CAMELYON16's layout: `Annotation N` polygons in groups `_0` (largest tumor),
    `_1` (other tumors) and `_2` (exclusions: normal tissue inside a tumor outline), all three
    groups declared, coordinates as decimal strings in level-0 px;
  * a manifest.csv the pipeline reads (README "Your own slides").

Bounded memory and time: a level is never held. Each level is handed to tifffile as an iterator
of already-encoded JPEG tiles; a tile that touches no tissue gets the bytes of ONE glass tile
encoded once per slide, so glass costs a memory copy, and only tissue tiles are rendered.

The texture is procedural and a function of level-0 position only, so neighbouring tiles join
without seams and every level shows the same tissue: stroma (eosin) with smooth waves, nuclei
(hard-edged haematoxylin ellipses; tumor: larger, denser, darker) drawn from per-cell seeded
RNGs, a cell being a CELL_PX square of level 0, so a tile sees its neighbours' nuclei too. Levels
coarser than NUCLEI_MAX_LEVEL draw the nuclei's mean optical density instead of single nuclei.
Colours follow Beer-Lambert with typical H&E stain vectors, through one (H, E) -> RGB lookup.

    python -m pipeline.synth_camelyon --out data/camelyon_synth --n-slides 3 --scale 1
"""

from __future__ import annotations

import csv
import math
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile
import typer
from PIL import Image, ImageDraw

from pipeline.errors import PipelineError
from pipeline.io import atomic_path
from pipeline.synth import slide_label

LEVEL0_MPP = 0.243  # CAMELYON16 level 0 (Radboud / Utrecht scanners), um/px
TILE_PX = 512  # TIFF tile side (most CAMELYON16 slides)
TOP_LEVEL_MAX_PX = 500  # halve until the longer side of the coarsest level is below this
JPEG_QUALITY = 80
CELL_PX = 512  # level-0 side of one nucleus cell (its own seeded RNG)
NUCLEI_MAX_LEVEL = 2  # finest levels draw single nuclei (<= 0.97 um/px); coarser: mean density
GLASS_RGB = (243, 242, 244)  # every glass pixel, so glass tiles are byte-identical

# Optical-density vectors of haematoxylin and eosin (unit length; typical Macenko estimates).
H_OD = np.array([0.5626, 0.7201, 0.4062])
E_OD = np.array([0.2159, 0.8012, 0.5581])
H_MAX_OD, E_MAX_OD = 2.5, 1.5  # H and E concentrations are quantised to uint8 over [0, max]

# Nuclei: (radius um range, density per um^2, haematoxylin OD range)
NORMAL_NUCLEI = ((2.2, 3.2), 0.0060, (0.9, 1.3))
TUMOR_NUCLEI = ((3.6, 5.5), 0.0048, (1.3, 1.8))
# Stroma concentrations (H, E) of normal tissue and of tumor
NORMAL_STROMA = (0.10, 0.60)
TUMOR_STROMA = (0.28, 0.38)

ASAP_GROUP_COLORS = {"_0": "#F4FA58", "_1": "#F4FA58", "_2": "#64FE2E"}


class SynthError(PipelineError):
    """Generator settings cannot make a slide (one line naming the setting)."""


@dataclass(frozen=True, eq=False)
class CamelyonSlideSpec:
    """Geometry of one slide; polygons are (K, 2) float arrays of level-0 (x, y) px."""

    width_px: int
    height_px: int
    seed: int
    lumps: tuple[np.ndarray, ...]
    tumors: tuple[np.ndarray, ...] = ()  # first = largest (group _0), others group _1
    exclusions: tuple[np.ndarray, ...] = ()  # group _2, inside a tumor
    mpp: float = LEVEL0_MPP

    @property
    def n_levels(self) -> int:
        n, long_side = 1, max(self.width_px, self.height_px)
        while long_side >= TOP_LEVEL_MAX_PX:
            long_side //= 2
            n += 1
        return n

    def level_shape(self, level: int) -> tuple[int, int]:
        """(height, width) of a level: level 0 halved `level` times (floor), at least 1."""
        return max(1, self.height_px >> level), max(1, self.width_px >> level)


# -- geometry ----------------------------------------------------------------------------------
def blob(center: Sequence[float], diameter: float, aspect: float, angle: float,
         rng: np.random.Generator, n_vertices: int = 120, roughness: float = 0.12) -> np.ndarray:
    """An irregular ellipse of longest axis ~`diameter` (radius modulated by low harmonics)."""
    theta = np.linspace(0.0, 2 * np.pi, n_vertices, endpoint=False)
    ks = np.arange(2, 6)
    amp = rng.random(ks.size) / ks
    amp *= roughness / amp.sum()
    phase = rng.uniform(0, 2 * np.pi, (ks.size, 1))
    mod = 1 + (amp[:, None] * np.cos(ks[:, None] * theta + phase)).sum(0)
    x = diameter / 2 * mod * np.cos(theta)
    y = diameter / 2 / aspect * mod * np.sin(theta)
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([center[0] + c * x - s * y, center[1] + s * x + c * y], axis=1)


def plan_camelyon_slide(
    seed: int,
    width_px: int = 96_000,
    height_px: int = 48_000,
    n_lumps: int | None = None,
    lump_um: float = 3000.0,
    tumor_fraction: float = 0.35,
    n_tumors: int = 2,
    mpp: float = LEVEL0_MPP,
) -> CamelyonSlideSpec:
    """Random geometry: `n_lumps` (default 1-3) lumps of ~`lump_um` longest axis side by side
    along the long axis, and `n_tumors` tumor blobs inside the first lump whose largest spans
    `tumor_fraction` of the lump's diameter (an exclusion is cut from it)."""
    rng = np.random.default_rng(seed)
    n_lumps = int(rng.integers(1, 4)) if n_lumps is None else n_lumps
    d_px = lump_um / mpp
    if n_lumps < 1 or n_lumps * d_px * 1.15 > width_px or d_px * 1.1 > height_px:
        raise SynthError(f"{n_lumps} lumps of {lump_um:g} um do not fit a {width_px} x "
                         f"{height_px} px slide at {mpp} um/px")
    slot = width_px / n_lumps
    lumps = []
    for i in range(n_lumps):
        d = d_px * rng.uniform(0.85, 1.0)
        cx = slot * (i + 0.5) + rng.uniform(-1, 1) * max(0.0, slot - 1.15 * d) / 2
        cy = height_px / 2 + rng.uniform(-1, 1) * max(0.0, height_px - 1.15 * d) / 2
        lumps.append(blob((cx, cy), d, rng.uniform(1.0, 1.3), rng.uniform(0, np.pi), rng))
    tumors, exclusions = [], []
    c0 = lumps[0].mean(0)
    for k in range(n_tumors):
        d = d_px * tumor_fraction * (1.0 if k == 0 else rng.uniform(0.3, 0.5))
        ang = rng.uniform(0, 2 * np.pi)
        off = 0.0 if k == 0 else d_px * 0.28
        center = c0 + off * np.array([math.cos(ang), math.sin(ang)])
        tumors.append(blob(center, d, rng.uniform(1.0, 1.4), rng.uniform(0, np.pi), rng))
    if tumors:
        exclusions.append(blob(tumors[0].mean(0), d_px * tumor_fraction * 0.25, 1.2,
                               rng.uniform(0, np.pi), rng, n_vertices=48))
    return CamelyonSlideSpec(width_px, height_px, seed, tuple(lumps), tuple(tumors),
                             tuple(exclusions), mpp)


# -- rendering ---------------------------------------------------------------------------------
def _stain_lut() -> np.ndarray:
    """(65536, 3) uint8 RGB of quantised (H, E) concentrations, index H << 8 | E."""
    h = np.arange(256) / 255.0 * H_MAX_OD
    e = np.arange(256) / 255.0 * E_MAX_OD
    od = h[:, None, None] * H_OD + e[None, :, None] * E_OD
    glass = -np.log(np.asarray(GLASS_RGB) / 255.0)
    return np.clip(255.0 * np.exp(-(od + glass)) + 0.5, 0, 255).astype(np.uint8).reshape(-1, 3)


_LUT = _stain_lut()


def _raster(polys: Sequence[np.ndarray], x0: float, y0: float, w: int, h: int,
            ds: float) -> np.ndarray:
    """bool (h, w): pixel centres of the level region at (x0, y0) (level px, downsample `ds`)
    inside any polygon (level-0 px)."""
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    for p in polys:
        q = p / ds - (x0, y0)
        if q[:, 0].max() < 0 or q[:, 1].max() < 0 or q[:, 0].min() > w or q[:, 1].min() > h:
            continue
        draw.polygon([(float(x), float(y)) for x, y in q], fill=255)
    return np.asarray(img) > 0


def _waves(seed: int, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
    """Smooth zero-mean texture (sum of 4 plane waves, wavelengths 25-200 um) at the outer
    product of x_um (w,) and y_um (h,); a function of position only."""
    rng = np.random.default_rng([seed, 77])
    out = np.zeros((y_um.size, x_um.size), np.float32)
    for _ in range(4):
        k = 2 * np.pi / rng.uniform(25, 200)
        a = rng.uniform(0, np.pi)
        ph = rng.uniform(0, 2 * np.pi)
        ax = (k * math.cos(a) * x_um + ph).astype(np.float32)
        ay = (k * math.sin(a) * y_um).astype(np.float32)
        # cos(ax + ay) without a 2-D trig call
        out += np.outer(np.cos(ay), np.cos(ax)) - np.outer(np.sin(ay), np.sin(ax))
    return out / 2.0


def _cell_nuclei(spec: CamelyonSlideSpec, ci: int, cj: int, style) -> tuple[np.ndarray, ...]:
    """Nuclei of level-0 cell (row ci, col cj) of one style: x, y (level-0 px), radius (px),
    aspect, OD. Seeded by (slide seed, cell, style) only."""
    (r_lo, r_hi), density, (od_lo, od_hi) = style
    rng = np.random.default_rng([spec.seed, ci, cj, int(density * 1e6)])
    n = rng.poisson(density * (CELL_PX * spec.mpp) ** 2)
    x = (cj + rng.random(n)) * CELL_PX
    y = (ci + rng.random(n)) * CELL_PX
    r = rng.uniform(r_lo, r_hi, n) / spec.mpp
    return x, y, r, rng.uniform(1.0, 1.5, n), rng.uniform(od_lo, od_hi, n)


def _draw_nuclei(spec: CamelyonSlideSpec, x0: int, y0: int, w: int, h: int, ds: int,
                 tissue: np.ndarray, tumor: np.ndarray) -> np.ndarray:
    """uint8 (h, w) quantised haematoxylin of single nuclei (ellipses) in the level region;
    normal nuclei where the centre is normal tissue, tumor nuclei where it is tumor."""
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    pad = TUMOR_NUCLEI[0][1] * 1.5 / spec.mpp  # level-0 px: largest nucleus' half axis
    gx0, gy0 = x0 * ds - pad, y0 * ds - pad
    gx1, gy1 = (x0 + w) * ds + pad, (y0 + h) * ds + pad
    for ci in range(max(0, int(gy0 // CELL_PX)), int(gy1 // CELL_PX) + 1):
        for cj in range(max(0, int(gx0 // CELL_PX)), int(gx1 // CELL_PX) + 1):
            for style, want_tumor in ((NORMAL_NUCLEI, False), (TUMOR_NUCLEI, True)):
                x, y, r, asp, od = _cell_nuclei(spec, ci, cj, style)
                lx, ly = x / ds - x0, y / ds - y0
                a, b = r * np.sqrt(asp) / ds, r / np.sqrt(asp) / ds
                a, b = np.where(od > od.mean(), a, b), np.where(od > od.mean(), b, a)
                inside = (lx + a > 0) & (lx - a < w) & (ly + b > 0) & (ly - b < h)
                col = np.clip(lx.astype(int), 0, w - 1)
                row = np.clip(ly.astype(int), 0, h - 1)
                # the centre's own class (centres off the region: the nearest edge pixel's)
                keep = inside & tissue[row, col] & (tumor[row, col] == want_tumor)
                fill = (od * (255 / H_MAX_OD)).astype(int)
                for k in np.flatnonzero(keep):
                    draw.ellipse((lx[k] - a[k], ly[k] - b[k], lx[k] + a[k], ly[k] + b[k]),
                                 fill=int(fill[k]))
    return np.asarray(img)


def _mean_nuclear_od(style) -> float:
    """Mean haematoxylin OD that a style's nuclei add per unit tissue area."""
    (r_lo, r_hi), density, (od_lo, od_hi) = style
    area = math.pi * (r_lo**2 + r_lo * r_hi + r_hi**2) / 3
    return min(1.0, density * area) * (od_lo + od_hi) / 2


def render_region(spec: CamelyonSlideSpec, level: int, x0: int, y0: int, w: int,
                  h: int) -> np.ndarray | None:
    """RGB uint8 (h, w, 3) of the level region whose top-left is (x0, y0) level px; None when
    no pixel centre of it is tissue (the caller writes glass)."""
    ds = 2**level
    box = np.array([x0, y0, x0 + w, y0 + h], float) * ds
    if not any(p[:, 0].max() >= box[0] and p[:, 0].min() <= box[2] and p[:, 1].max() >= box[1]
               and p[:, 1].min() <= box[3] for p in spec.lumps):
        return None  # the region's box misses every lump's box: glass, nothing to draw
    tissue = _raster(spec.lumps, x0, y0, w, h, ds)
    if not tissue.any():
        return None
    tumor = _raster(spec.tumors, x0, y0, w, h, ds) & ~_raster(spec.exclusions, x0, y0, w, h, ds)
    tumor &= tissue
    um = spec.mpp * ds
    wav = _waves(spec.seed, (x0 + np.arange(w) + 0.5) * um, (y0 + np.arange(h) + 0.5) * um)
    hs, es = 255 / H_MAX_OD, 255 / E_MAX_OD
    grain = np.random.default_rng([spec.seed, level, x0, y0]).integers(0, 7, (h, w), np.int16)
    hq = np.where(tumor, np.int16(TUMOR_STROMA[0] * hs), np.int16(NORMAL_STROMA[0] * hs))
    hq += grain
    if level <= NUCLEI_MAX_LEVEL:
        hq += _draw_nuclei(spec, x0, y0, w, h, ds, tissue, tumor)
    else:
        mean_n, mean_t = _mean_nuclear_od(NORMAL_NUCLEI), _mean_nuclear_od(TUMOR_NUCLEI)
        hq += np.where(tumor, np.int16(mean_t * hs), np.int16(mean_n * hs))
    e_base = np.where(tumor, np.float32(TUMOR_STROMA[1] * es), np.float32(NORMAL_STROMA[1] * es))
    eq = (e_base * (1 + 0.18 * wav)).astype(np.int16)
    eq += grain[::-1]
    np.clip(hq, 0, 255, out=hq)
    np.clip(eq, 0, 255, out=eq)
    rgb = _LUT[(hq.astype(np.uint16) << 8) | eq.astype(np.uint16)]
    rgb[~tissue] = GLASS_RGB
    return rgb


# -- writing -----------------------------------------------------------------------------------
def encode_tile(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """One TILE_PX x TILE_PX RGB tile as the JPEG stream tifffile writes for compression='jpeg',
    photometric='rgb' (YCbCr, 2x2 chroma subsampling): tifffile then only copies the bytes."""
    return bytes(imagecodecs.jpeg8_encode(rgb, level=quality, colorspace="RGB",
                                          outcolorspace="YCBCR", subsampling=(2, 2)))


def level_tiles(spec: CamelyonSlideSpec, level: int, glass: bytes,
                quality: int = JPEG_QUALITY, stats: dict | None = None) -> Iterator[bytes]:
    """Encoded tiles of one level in row-major order; glass tiles are the shared `glass`."""
    h, w = spec.level_shape(level)
    for y0 in range(0, h, TILE_PX):
        for x0 in range(0, w, TILE_PX):
            th, tw = min(TILE_PX, h - y0), min(TILE_PX, w - x0)
            rgb = render_region(spec, level, x0, y0, tw, th)
            if rgb is None:
                if stats is not None:
                    stats["glass_tiles"] = stats.get("glass_tiles", 0) + 1
                yield glass
                continue
            if (th, tw) != (TILE_PX, TILE_PX):  # edge tile: padded with glass (cropped on read)
                full = np.empty((TILE_PX, TILE_PX, 3), np.uint8)
                full[:] = GLASS_RGB
                full[:th, :tw] = rgb
                rgb = full
            if stats is not None:
                stats["tissue_tiles"] = stats.get("tissue_tiles", 0) + 1
            yield encode_tile(rgb, quality)


def glass_tile(quality: int = JPEG_QUALITY) -> bytes:
    tile = np.empty((TILE_PX, TILE_PX, 3), np.uint8)
    tile[:] = GLASS_RGB
    return encode_tile(tile, quality)


def write_camelyon_tiff(spec: CamelyonSlideSpec, path: str | Path,
                        quality: int = JPEG_QUALITY) -> dict:
    """Write `spec` as a pyramidal tiled JPEG TIFF, level by level, tile by tile (atomically).
    Returns {"levels": [[w, h], ...], "tissue_tiles": n, "glass_tiles": n}."""
    glass = glass_tile(quality)
    stats: dict = {"levels": []}
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for level in range(spec.n_levels):
            h, w = spec.level_shape(level)
            px_per_cm = 1e4 / (spec.mpp * 2**level)
            tif.write(level_tiles(spec, level, glass, quality, stats), shape=(h, w, 3),
                      dtype=np.uint8, tile=(TILE_PX, TILE_PX), photometric="rgb",
                      compression="jpeg", compressionargs={"level": quality},
                      subfiletype=0 if level == 0 else 1, metadata=None,
                      resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
            stats["levels"].append([w, h])
    return stats


def write_camelyon_xml(path: str | Path, spec: CamelyonSlideSpec) -> None:
    """ASAP XML as CAMELYON16 ships it: `Annotation N` polygons, largest tumor in group `_0`,
    other tumors in `_1`, exclusions in `_2`; groups `_0`, `_1`, `_2` all declared."""
    root = ET.Element("ASAP_Annotations")
    anns = ET.SubElement(root, "Annotations")
    items = [(p, "_0" if i == 0 else "_1") for i, p in enumerate(spec.tumors)]
    items += [(p, "_2") for p in spec.exclusions]
    for i, (poly, group) in enumerate(items):
        a = ET.SubElement(anns, "Annotation", Name=f"Annotation {i}", Type="Polygon",
                          PartOfGroup=group, Color=ASAP_GROUP_COLORS[group])
        coords = ET.SubElement(a, "Coordinates")
        for j, (x, y) in enumerate(np.asarray(poly, dtype=float)):
            ET.SubElement(coords, "Coordinate", Order=str(j), X=f"{x:.4f}", Y=f"{y:.4f}")
    groups = ET.SubElement(root, "AnnotationGroups")
    for g, color in ASAP_GROUP_COLORS.items():
        grp = ET.SubElement(groups, "Group", Name=g, PartOfGroup="None", Color=color)
        ET.SubElement(grp, "Attributes")
    ET.indent(root, space="\t")
    with atomic_path(path) as tmp:
        ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)


def write_camelyon_set(
    out: str | Path,
    n_slides: int = 3,
    scale: float = 1.0,
    seed: int = 0,
    width_px: int = 96_000,
    height_px: int = 48_000,
    lump_um: float = 3000.0,
    n_lumps: int | None = None,
    splits: Sequence[str] = ("train", "val", "test"),
    quality: int = JPEG_QUALITY,
    tumor_fraction: float = 0.35,
) -> Path:
    """`n_slides` slides `tumor_NNN.tif` + `.xml` and `manifest.csv` under `out` (splits cycle
    through `splits`). `scale` multiplies the tissue area AND the slide area (lump and slide
    sides by sqrt(scale)), so the tissue's share of the slide stays the same. Returns the
    manifest path."""
    if scale <= 0 or n_slides < 1:
        raise SynthError(f"synth-camelyon: need scale > 0 and n_slides >= 1, got {scale}, "
                         f"{n_slides}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    f = math.sqrt(scale)
    rows = []
    for i in range(n_slides):
        sid = f"tumor_{i + 1:03d}"
        spec = plan_camelyon_slide(seed * 1000 + i, int(round(width_px * f)),
                                   int(round(height_px * f)), n_lumps, lump_um * f,
                                   tumor_fraction)
        write_camelyon_tiff(spec, out / f"{sid}.tif", quality)
        write_camelyon_xml(out / f"{sid}.xml", spec)
        rows.append([sid, f"{sid}.tif", f"{sid}.xml", splits[i % len(splits)], sid,
                     slide_label(spec.tumors, spec.mpp)])
    manifest = out / "manifest.csv"
    with atomic_path(manifest) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["slide_id", "slide_path", "annotation_path", "split", "patient_id",
                    "slide_label"])
        w.writerows(rows)
    return manifest


def cli(
    out: Path = typer.Option(..., "--out", help="output folder (slides, XML, manifest.csv)"),
    n_slides: int = typer.Option(3, "--n-slides", help="number of slides"),
    scale: float = typer.Option(1.0, "--scale", help="tissue (and slide) area multiplier"),
    seed: int = typer.Option(0, "--seed", help="RNG seed (same seed: same slides)"),
    width_px: int = typer.Option(96_000, "--width-px", help="level-0 width at scale 1"),
    height_px: int = typer.Option(48_000, "--height-px", help="level-0 height at scale 1"),
    lump_mm: float = typer.Option(3.0, "--lump-mm", help="tissue lump diameter at scale 1, mm"),
    n_lumps: int | None = typer.Option(None, "--n-lumps", help="lumps per slide (default 1-3)"),
    splits: str = typer.Option("train,val,test", "--splits", help="splits, cycled over slides"),
    tumor_fraction: float = typer.Option(
        0.35, "--tumor-fraction", help="largest tumor's diameter / its lump's diameter"),
) -> None:
    """Write CAMELYON16-shaped synthetic slides (0.243 um/px tiled JPEG TIFF pyramids, mostly
    glass, ASAP XML in CAMELYON16's layout) and a manifest.csv for data.manifest."""
    manifest = write_camelyon_set(out, n_slides, scale, seed, width_px, height_px,
                                  lump_mm * 1000.0, n_lumps, [s.strip() for s in splits.split(",")],
                                  tumor_fraction=tumor_fraction)
    typer.echo(f"synth-camelyon: {n_slides} slides -> {manifest}")


def main() -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(cli)
    try:
        app()
    except PipelineError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
