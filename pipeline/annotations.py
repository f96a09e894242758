"""Pathologist annotations: read ASAP XML / QuPath GeoJSON / mask images, write ASAP XML and
QuPath GeoJSON, and rasterise them. Coordinates are always level-0 pixels (x, y) as float.

Readers return one `Annotation` whatever the format:
  tumor      polygons inside tumor (ASAP groups `_0`, `_1`, `Tumor`; GeoJSON class "Tumor")
  exclusion  normal regions cut out of tumor (ASAP groups `_2`, `Exclusion`)
  normal     explicitly annotated normal tissue (GeoJSON class "Normal"); when a file has any,
             tissue outside them is *unannotated*, otherwise (CAMELYON16 convention: tumor is
             annotated exhaustively) everything that is not tumor is normal
  mask       a binary tumor mask (non-zero = tumor) with its level-0 px per mask px
Group / class names are matched case-insensitively; polygon names are never used. Unknown
groups / classes, polygons with < 3 points and non-area shapes are skipped with one warning per
file that lists them. Malformed files raise `AnnotationError` (one line: file and reason).

Rasterisation convention (`rasterize`, `sample_mask`): raster pixel (i, j) stands for the
level-0 point (x0 + (j + 0.5) * pitch, y0 + (i + 0.5) * pitch), i.e. pixel centres are sampled,
and it is inside a ring when that point is inside or on the ring (`skimage.draw.polygon` counts
boundary points as inside: a ring spanning x in [a, b] contains the centres with a <= x <= b).
A ring is filled on its own (even-odd within the ring) and a polygon is its exterior fill minus
the union of its hole fills (so a centre exactly on a hole's edge is outside the polygon).
Self-intersecting rings are neither repaired nor rejected (no shapely here): the even-odd rule
defines them, so a bow-tie is its two triangles and a pentagram's central pentagon is outside
(QuPath/ASAP draw them the same way). Separate polygons of one category are unioned, never
XOR-ed, so overlapping annotations of the same tumor count once.
Shapes outside the raster are clipped by `skimage.draw.polygon`'s `shape` argument, so polygons
partly outside the slide need no special handling. Mask pixel (r, c) covers level-0
[c * sx, (c + 1) * sx) x [r * sy, (r + 1) * sy) and is sampled at the same centres (nearest).
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.io import atomic_path
from pipeline.log import get_logger

log = get_logger("pipeline.annotations")

# CAMELYON16 layout: tumor polygons in groups _0 / _1 (or "Tumor"), exclusions in _2.
ASAP_TUMOR_GROUP = "_0"
ASAP_EXCLUSION_GROUP = "_2"
_ASAP_COLORS = {"_0": "#F4FA58", "_1": "#F4FA58", "_2": "#64FE2E"}
# Lower-cased group name -> category.
ASAP_GROUPS = {"_0": "tumor", "_1": "tumor", "tumor": "tumor",
               "_2": "exclusion", "exclusion": "exclusion"}
# ASAP shape types that are points, not areas.
_ASAP_NON_AREA = {"dot", "pointset", "measurement"}

GEOJSON_CLASSES = {"tumor": "tumor", "normal": "normal"}  # lower-cased class name -> category
_QUPATH_COLORS = {"tumor": [200, 0, 0], "normal": [0, 150, 0]}
_QUPATH_DEFAULT_COLOR = [0, 0, 180]

FORMAT_BY_SUFFIX = {".xml": "asap_xml", ".geojson": "geojson", ".json": "geojson",
                    ".tif": "mask", ".tiff": "mask", ".png": "mask"}

# A mask whose per-axis scales differ by more than this (relative) does not match the slide.
MASK_ASPECT_TOLERANCE = 0.02


class AnnotationError(PipelineError):
    """An annotation file cannot be used; str() is one line naming the file and the cause."""


@dataclass(frozen=True)
class Polygon:
    """A polygon in level-0 px: exterior ring (K, 2) of (x, y) and interior rings (holes).
    Rings are stored open (the closing point is not repeated)."""

    exterior: np.ndarray
    holes: tuple[np.ndarray, ...] = ()

    def bounds(self) -> tuple[float, float, float, float]:
        """(x_min, y_min, x_max, y_max) of the exterior, level-0 px."""
        x, y = self.exterior[:, 0], self.exterior[:, 1]
        return float(x.min()), float(y.min()), float(x.max()), float(y.max())


@dataclass(frozen=True)
class MaskAnnotation:
    """A binary tumor mask; mask pixel (r, c) covers level-0 x in [c*sx, (c+1)*sx), likewise y."""

    array: np.ndarray  # (H, W) bool
    scale_xy: tuple[float, float]  # level-0 px per mask px along x and y


@dataclass
class Annotation:
    """Everything a slide's annotation file says, in level-0 px."""

    path: str
    format: str  # "asap_xml" | "geojson" | "mask"
    tumor: list[Polygon] = field(default_factory=list)
    exclusion: list[Polygon] = field(default_factory=list)
    normal: list[Polygon] = field(default_factory=list)
    mask: MaskAnnotation | None = None

    @property
    def has_explicit_normal(self) -> bool:
        return len(self.normal) > 0


# -- geometry helpers ------------------------------------------------------------------------
def _ring(points: Any) -> np.ndarray | None:
    """(K, 2) float64 open ring from a point list; None (caller skips) if < 3 distinct points."""
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise ValueError("coordinates are not a list of (x, y) points")
    arr = arr[:, :2]
    if not np.isfinite(arr).all():
        raise ValueError("non-finite coordinate")
    if len(arr) > 1 and np.array_equal(arr[0], arr[-1]):
        arr = arr[:-1]  # GeoJSON rings repeat the first point
    if len(np.unique(arr, axis=0)) < 3:
        return None
    return arr


def as_polygon(p: Polygon | np.ndarray | Sequence) -> Polygon:
    """A Polygon from a Polygon or a (K, 2) array of level-0 (x, y)."""
    if isinstance(p, Polygon):
        return p
    return Polygon(np.asarray(p, dtype=np.float64).reshape(-1, 2))


# -- readers ---------------------------------------------------------------------------------
def annotation_format(path: str | Path) -> str:
    """The format of an annotation file from its suffix: asap_xml | geojson | mask."""
    fmt = FORMAT_BY_SUFFIX.get(Path(path).suffix.lower())
    if fmt is None:
        raise AnnotationError(
            f"{path}: unknown annotation suffix (expected one of "
            f"{', '.join(sorted(FORMAT_BY_SUFFIX))})"
        )
    return fmt


def read_annotation(
    path: str | Path,
    slide_size_px_level0: tuple[int, int] | None = None,
    max_mask_downsample: float | None = None,
) -> Annotation:
    """Read an ASAP XML, QuPath GeoJSON or mask image (dispatch by suffix).

    `slide_size_px_level0` (w, h) is needed for masks only: the mask's scale is its size
    relative to the slide. `max_mask_downsample`: for pyramidal mask TIFFs, read the coarsest
    level at most this coarse (level-0 px per mask px); default the finest level.
    """
    path = Path(path)
    fmt = annotation_format(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: annotation file not found")
    if fmt == "asap_xml":
        return read_asap_xml(path)
    if fmt == "geojson":
        return read_qupath_geojson(path)
    return read_mask(path, slide_size_px_level0, max_mask_downsample)


def read_asap_xml(path: str | Path) -> Annotation:
    """Read an ASAP / CAMELYON16 XML file. Annotations are sorted into tumor / exclusion by
    their group (`PartOfGroup`), following nested AnnotationGroups up to a known group."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise AnnotationError(f"{path}: malformed ASAP XML: {exc}") from None
    except OSError as exc:
        raise AnnotationError(f"{path}: cannot read: {exc}") from None
    if root.tag != "ASAP_Annotations":
        raise AnnotationError(f"{path}: not an ASAP annotation file (root element <{root.tag}>)")
    parent = {g.get("Name", ""): g.get("PartOfGroup", "None") for g in root.iter("Group")}
    out = Annotation(path=str(path), format="asap_xml")
    unknown: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    for k, ann in enumerate(root.iter("Annotation")):
        group = ann.get("PartOfGroup", "None")
        category = _asap_category(group, parent)
        if category is None:
            unknown[group] += 1
            continue
        kind = (ann.get("Type") or "Polygon").lower()
        if kind in _ASAP_NON_AREA:
            skipped[f"type {ann.get('Type')}"] += 1
            continue
        coords = ann.findall("./Coordinates/Coordinate")
        where = f"{path}: annotation {k} ({ann.get('Name', '')!r})"
        try:
            coords.sort(key=lambda c: float(c.get("Order", "0")))
            pts = [(_float(c.get("X")), _float(c.get("Y"))) for c in coords]
            ring = _ring(pts) if pts else None
        except (TypeError, ValueError) as exc:
            raise AnnotationError(f"{where}: bad coordinate: {exc}") from None
        if ring is None:
            skipped["< 3 points"] += 1
            continue
        getattr(out, category).append(Polygon(ring))
    _warn_skipped(path, "unknown ASAP group(s)", unknown)
    _warn_skipped(path, "skipped annotation(s)", skipped)
    return out


def _float(s: str | None) -> float:
    if s is None:
        raise ValueError("missing X or Y")
    return float(s.replace(",", "."))  # some exports write decimal commas


def _asap_category(group: str, parent: dict[str, str]) -> str | None:
    """tumor / exclusion for a group name, walking up nested groups; None when unknown."""
    seen: set[str] = set()
    g = group
    while g not in seen:
        cat = ASAP_GROUPS.get(g.strip().lower())
        if cat is not None:
            return cat
        seen.add(g)
        g = parent.get(g, "None")
    return None


def read_qupath_geojson(path: str | Path) -> Annotation:
    """Read a QuPath GeoJSON export (FeatureCollection, a single Feature or a bare list of
    Features). Polygon / MultiPolygon geometries; interior rings are holes. Class "Tumor" is
    tumor, "Normal" explicitly annotated normal; other classes and non-annotation objects
    (detections, cells) are skipped with a warning."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"{path}: malformed GeoJSON: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path}: cannot read: {exc}") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    else:
        features = data
    if not isinstance(features, list):
        raise AnnotationError(
            f"{path}: malformed GeoJSON: expected a FeatureCollection or a list of Features"
        )
    out = Annotation(path=str(path), format="geojson")
    unknown: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    for k, feat in enumerate(features):
        where = f"{path}: feature {k}"
        if not isinstance(feat, dict) or feat.get("type") != "Feature":
            raise AnnotationError(f"{where}: malformed GeoJSON: not a Feature")
        props = feat.get("properties") or {}
        obj_type = props.get("objectType", "annotation")
        if obj_type != "annotation":
            skipped[f"objectType {obj_type}"] += 1
            continue
        name = _class_name(props.get("classification"))
        category = GEOJSON_CLASSES.get(name.lower()) if name else None
        if category is None:
            unknown[name or "(unclassified)"] += 1
            continue
        try:
            polys, n_bad = _geometry_polygons(feat.get("geometry"), skipped)
        except (TypeError, ValueError, KeyError) as exc:
            raise AnnotationError(f"{where}: malformed geometry: {exc}") from None
        if n_bad:
            skipped["< 3 points"] += n_bad
        getattr(out, category).extend(polys)
    _warn_skipped(path, "unknown classification(s)", unknown)
    _warn_skipped(path, "skipped object(s)", skipped)
    return out


def _class_name(cls: Any) -> str:
    if isinstance(cls, str):
        return cls
    if isinstance(cls, dict):
        if isinstance(cls.get("name"), str):
            return cls["name"]
        names = cls.get("names")  # QuPath derived classes: ["Tumor", "Positive"]
        if isinstance(names, list) and names:
            return ": ".join(str(n) for n in names)
    return ""


def _geometry_polygons(geom: Any, skipped: Counter[str]) -> tuple[list[Polygon], int]:
    """Polygons of a GeoJSON geometry and the number of rings dropped for < 3 points."""
    if not isinstance(geom, dict):
        raise ValueError("no geometry object")
    gtype = geom.get("type")
    if gtype == "Polygon":
        parts = [geom["coordinates"]]
    elif gtype == "MultiPolygon":
        parts = geom["coordinates"]
    elif gtype == "GeometryCollection":
        polys, bad = [], 0
        for g in geom.get("geometries", []):
            p, b = _geometry_polygons(g, skipped)
            polys += p
            bad += b
        return polys, bad
    else:
        skipped[f"geometry {gtype}"] += 1
        return [], 0
    polys, bad = [], 0
    for rings in parts:
        if not isinstance(rings, list) or not rings:
            raise ValueError("polygon without rings")
        ext = _ring(rings[0])
        if ext is None:
            bad += 1
            continue
        holes = []
        for h in rings[1:]:
            hr = _ring(h)
            if hr is None:
                bad += 1
            else:
                holes.append(hr)
        polys.append(Polygon(ext, tuple(holes)))
    return polys, bad


def read_mask(
    path: str | Path,
    slide_size_px_level0: tuple[int, int] | None = None,
    max_downsample: float | None = None,
) -> Annotation:
    """Read a tumor mask image (TIFF, possibly pyramidal, or PNG); non-zero = tumor. The scale
    (level-0 px per mask px) is the slide size over the mask size; without the slide size the
    mask is taken to be at level 0. From a pyramid, the coarsest level whose downsample is
    <= `max_downsample` is read (the finest when None)."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            arr = _read_tiff_mask(path, slide_size_px_level0, max_downsample)
        else:
            arr = _read_pil_mask(path)
    except AnnotationError:
        raise
    except Exception as exc:  # tifffile / PIL raise many types for corrupt files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AnnotationError(f"{path}: cannot read mask image: {msg}") from None
    if arr.ndim == 3:
        arr = (arr[..., : min(3, arr.shape[2])] != 0).any(axis=2)  # any colour channel
    if arr.ndim != 2:
        raise AnnotationError(f"{path}: mask image has shape {arr.shape}, expected 2-D")
    mask = np.asarray(arr != 0)
    h, w = mask.shape
    scale = (1.0, 1.0) if slide_size_px_level0 is None else _mask_scale(
        path, (w, h), slide_size_px_level0)
    return Annotation(path=str(path), format="mask", mask=MaskAnnotation(mask, scale))


def _mask_scale(path: Path, mask_wh: tuple[int, int], slide_wh: tuple[int, int]) -> tuple[
        float, float]:
    """Level-0 px per mask px. A pyramid level of size floor/ceil(slide / k) for an integer k
    gets exactly k (so the mask does not drift by the rounding); otherwise per-axis ratios."""
    (mw, mh), (sw, sh) = mask_wh, slide_wh
    sx, sy = sw / mw, sh / mh
    k = max(1, round((sx + sy) / 2))
    if mw in (sw // k, -(-sw // k)) and mh in (sh // k, -(-sh // k)):
        return float(k), float(k)
    if abs(sx - sy) > MASK_ASPECT_TOLERANCE * max(sx, sy):
        raise AnnotationError(
            f"{path}: mask size {mw}x{mh} does not match the slide's {sw}x{sh} "
            f"(scales {sx:.3f} and {sy:.3f} differ)"
        )
    return sx, sy


def _read_tiff_mask(path: Path, slide_wh: tuple[int, int] | None,
                    max_downsample: float | None) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        levels = [lvl for s in tif.series for lvl in s.levels]
        if not levels:
            raise AnnotationError(f"{path}: TIFF has no image")

        levels.sort(key=lambda lvl: lvl.keyframe.imagewidth, reverse=True)  # finest first
        chosen = levels[0]
        if max_downsample is not None:
            ref_w = slide_wh[0] if slide_wh is not None else levels[0].keyframe.imagewidth
            for lvl in levels:
                if ref_w / lvl.keyframe.imagewidth <= max_downsample * (1 + 1e-6):
                    chosen = lvl
        arr = np.squeeze(chosen.asarray())
    return arr


def _read_pil_mask(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        if img.mode in ("RGB", "RGBA", "L", "LA", "P", "1", "I", "I;16", "F"):
            arr = np.asarray(img)
        else:
            arr = np.asarray(img.convert("RGB"))
    if arr.ndim == 3 and arr.shape[2] == 2:  # LA: luminance only
        arr = arr[..., 0]
    return arr


def _warn_skipped(path: Path, what: str, counts: Counter[str]) -> None:
    if counts:
        listed = ", ".join(f"{k!r} x{v}" for k, v in sorted(counts.items()))
        log.warning("%s: %s ignored: %s", path, what, listed)


# -- rasterisation ---------------------------------------------------------------------------
def _fill_ring(ring: np.ndarray, out: np.ndarray, value: bool, origin_rc: tuple[float, float],
               pitch: float) -> None:
    """Set `out`'s pixels whose centres lie inside `ring` (even-odd) to `value`; `origin_rc` is
    the level-0 (y, x) of `out`'s top-left corner."""
    from skimage.draw import polygon as draw_polygon

    # level-0 -> raster coordinates in which pixel centres are integers
    r = (ring[:, 1] - origin_rc[0]) / pitch - 0.5
    c = (ring[:, 0] - origin_rc[1]) / pitch - 0.5
    rr, cc = draw_polygon(r, c, shape=out.shape)
    out[rr, cc] = value


def rasterize(
    polygons: Iterable[Polygon],
    shape: tuple[int, int],
    origin_xy_px_level0: tuple[float, float] = (0.0, 0.0),
    pitch_px_level0: float = 1.0,
) -> np.ndarray:
    """(H, W) bool union of `polygons` (holes removed) sampled at raster pixel centres:
    pixel (i, j) is level-0 (x0 + (j + 0.5) * pitch, y0 + (i + 0.5) * pitch). Each polygon is
    filled inside its own bounding box (clipped to the raster), so polygons far from the
    raster cost nothing. Cost of `skimage.draw.polygon`: bbox pixels x vertices."""
    h, w = shape
    ox, oy = origin_xy_px_level0
    p = float(pitch_px_level0)
    out = np.zeros(shape, dtype=bool)
    for poly in polygons:
        x0, y0, x1, y1 = poly.bounds()
        # raster index range whose centres can be inside: centre j at ox + (j + .5) p
        j0 = max(0, math.floor((x0 - ox) / p - 0.5))
        j1 = min(w, math.ceil((x1 - ox) / p - 0.5) + 1)
        i0 = max(0, math.floor((y0 - oy) / p - 0.5))
        i1 = min(h, math.ceil((y1 - oy) / p - 0.5) + 1)
        if j0 >= j1 or i0 >= i1:
            continue
        local = np.zeros((i1 - i0, j1 - j0), dtype=bool)
        corner = (oy + i0 * p, ox + j0 * p)
        _fill_ring(poly.exterior, local, True, corner, p)
        for hole in poly.holes:
            _fill_ring(hole, local, False, corner, p)
        out[i0:i1, j0:j1] |= local
    return out


def sample_mask(
    mask: MaskAnnotation,
    shape: tuple[int, int],
    origin_xy_px_level0: tuple[float, float] = (0.0, 0.0),
    pitch_px_level0: float = 1.0,
) -> np.ndarray:
    """(H, W) bool: the mask sampled at the same raster pixel centres as `rasterize`
    (nearest mask pixel; outside the mask = False)."""
    h, w = shape
    ox, oy = origin_xy_px_level0
    sx, sy = mask.scale_xy
    xs = ox + (np.arange(w) + 0.5) * pitch_px_level0
    ys = oy + (np.arange(h) + 0.5) * pitch_px_level0
    cc = np.floor(xs / sx).astype(np.int64)
    rr = np.floor(ys / sy).astype(np.int64)
    mh, mw = mask.array.shape
    vc = (cc >= 0) & (cc < mw)
    vr = (rr >= 0) & (rr < mh)
    out = np.zeros(shape, dtype=bool)
    out[np.ix_(vr, vc)] = mask.array[np.ix_(rr[vr], cc[vc])]
    return out


# -- writers ---------------------------------------------------------------------------------
def write_asap_xml(
    path: str | Path,
    tumor_polygons: Sequence[np.ndarray],
    exclusion_polygons: Sequence[np.ndarray] = (),
    tumor_group: str = ASAP_TUMOR_GROUP,
) -> None:
    """Write polygons ((K, 2) arrays of level-0 x, y) as a CAMELYON16-style ASAP XML file.
    `Polygon` objects are accepted too; ASAP has no holes, so their holes are written to the
    exclusion group `_2` (which the CAMELYON16 convention subtracts from tumor)."""
    tumor = [as_polygon(p) for p in tumor_polygons]
    excl = [as_polygon(p).exterior for p in exclusion_polygons]
    excl += [h for p in tumor for h in p.holes]
    root = ET.Element("ASAP_Annotations")
    anns = ET.SubElement(root, "Annotations")
    items = [(p.exterior, tumor_group) for p in tumor]
    items += [(p, ASAP_EXCLUSION_GROUP) for p in excl]
    for i, (poly, group) in enumerate(items):
        a = ET.SubElement(anns, "Annotation", Name=f"Annotation {i}", Type="Polygon",
                          PartOfGroup=group, Color=_ASAP_COLORS.get(group, "#F4FA58"))
        coords = ET.SubElement(a, "Coordinates")
        for j, (x, y) in enumerate(np.asarray(poly, dtype=float)):
            ET.SubElement(coords, "Coordinate", Order=str(j), X=f"{x:.4f}", Y=f"{y:.4f}")
    groups = ET.SubElement(root, "AnnotationGroups")
    for g in sorted({g for _, g in items} or {tumor_group}):
        grp = ET.SubElement(groups, "Group", Name=g, PartOfGroup="None",
                            Color=_ASAP_COLORS.get(g, "#F4FA58"))
        ET.SubElement(grp, "Attributes")
    ET.indent(root)
    with atomic_path(path) as tmp:
        ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)


def write_qupath_geojson(
    path: str | Path,
    polygons: Sequence[Polygon | np.ndarray],
    classification: str = "Tumor",
    properties: list[dict] | None = None,
) -> None:
    """Write polygons as a QuPath-importable GeoJSON FeatureCollection: one Feature per polygon
    (Polygon geometry, closed rings, holes as interior rings, level-0 px rounded to 1e-4),
    properties {"objectType": "annotation", "classification": {"name", "color"}} updated with
    `properties[i]` (e.g. a name or a score) when given."""
    polys = [as_polygon(p) for p in polygons]
    if properties is not None and len(properties) != len(polys):
        raise ValueError(f"{len(properties)} property dicts for {len(polys)} polygons")
    color = _QUPATH_COLORS.get(classification.lower(), _QUPATH_DEFAULT_COLOR)
    features = []
    for i, poly in enumerate(polys):
        props: dict[str, Any] = {
            "objectType": "annotation",
            "classification": {"name": classification, "color": list(color)},
        }
        if properties is not None:
            props.update(properties[i])
        rings = [_closed(poly.exterior)] + [_closed(h) for h in poly.holes]
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": props,
        })
    text = json.dumps({"type": "FeatureCollection", "features": features}, default=_json_num)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")


def _closed(ring: np.ndarray) -> list[list[float]]:
    pts = [[_num(x), _num(y)] for x, y in np.asarray(ring, dtype=float)[:, :2]]
    if pts and pts[0] != pts[-1]:
        pts.append(list(pts[0]))
    return pts


def _num(v: float) -> float | int:
    r = round(float(v), 4)
    return int(r) if r.is_integer() and math.isfinite(r) else r


def _json_num(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
