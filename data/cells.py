"""S2 cells in the face/child-path notation of Hsu et al. 2020 ("2/1" = child 1 of face 2).

The token "F/" is face F at level 0; each further digit is the child position (0..3, Hilbert
order as S2 numbers children) one level down. Both directions are exact.
"""

from __future__ import annotations

import numpy as np
import s2sphere

MAX_LEVEL = 30


def cell_from_path(path: str) -> s2sphere.CellId:
    """CellId for a token such as '0/', '4/2' or '2/13'."""
    face_text, sep, children = path.partition("/")
    if not sep or not face_text.isdigit() or not 0 <= int(face_text) <= 5 or any(c not in "0123" for c in children):
        raise ValueError(f"bad S2 cell token {path!r}: expected 'F/' or 'F/digits' with F in 0..5, digits 0..3")
    level = len(children)
    cell_id = int(face_text) << 61
    for depth, child in enumerate(children, start=1):
        cell_id |= int(child) << (61 - 2 * depth)
    cell_id |= 1 << (60 - 2 * level)
    return s2sphere.CellId(cell_id)


def parse_cell(token: str) -> s2sphere.CellId:
    """CellId of a client id that names an S2 cell: face/child-path notation or an S2 hex token."""
    try:
        return cell_from_path(token)
    except ValueError:
        pass
    if token and len(token) <= 16 and all(c in "0123456789abcdef" for c in token.lower()):
        cell = s2sphere.CellId.from_token(token)
        if cell.is_valid():
            return cell
    raise ValueError(f"client id {token!r} is neither a face/child-path cell ('2/13') nor an S2 token ('89c25')")


def path_from_cell(cell: s2sphere.CellId) -> str:
    """Token for a CellId (inverse of `cell_from_path`)."""
    raw, level = cell.id(), cell.level()
    children = "".join(str((raw >> (61 - 2 * depth)) & 3) for depth in range(1, level + 1))
    return f"{raw >> 61}/{children}"


def cell_at(lat: float, lon: float, level: int) -> s2sphere.CellId:
    if not -90.0 <= lat <= 90.0 or not -180.0 <= lon <= 180.0:
        raise ValueError(f"coordinate out of range: lat={lat}, lon={lon}")
    return s2sphere.CellId.from_lat_lng(s2sphere.LatLng.from_degrees(lat, lon)).parent(level)


def path_at(lat: float, lon: float, level: int) -> str:
    """Token of the level-`level` cell that contains (lat, lon)."""
    return path_from_cell(cell_at(lat, lon, level))


def cell_holding(cells: list[str], lat: float, lon: float) -> int | None:
    """Index of the cell of `cells` that holds (lat, lon), or None; entries that are not S2 cells (a camera
    cluster's id) hold no coordinates."""
    point = cell_at(lat, lon, 30)
    for index, cell in enumerate(cells):
        try:
            if parse_cell(cell).contains(point):
                return index
        except ValueError:
            continue
    return None


def leaf_ids(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Leaf CellIds (uint64) of many points, so that parents at any level are cheap bit operations."""
    return np.array(
        [s2sphere.CellId.from_lat_lng(s2sphere.LatLng.from_degrees(a, b)).id() for a, b in zip(lat, lon, strict=True)],
        dtype=np.uint64,
    )


def parent_ids(leaves: np.ndarray, level: int) -> np.ndarray:
    """Ids of the level-`level` parents of leaf ids (vectorised CellId.parent)."""
    lsb = np.uint64(1 << (60 - 2 * level))
    return (leaves & ~(lsb * np.uint64(2) - np.uint64(1))) | lsb


def centre(path: str) -> tuple[float, float]:
    """(lat, lon) in degrees of a cell's centre."""
    lat_lng = cell_from_path(path).to_lat_lng()
    return lat_lng.lat().degrees, lat_lng.lng().degrees


def polygon(path: str) -> list[tuple[float, float]]:
    """The four (lat, lon) corners of a cell, for plotting."""
    cell = s2sphere.Cell(cell_from_path(path))
    corners = [s2sphere.LatLng.from_point(cell.get_vertex(k)) for k in range(4)]
    return [(c.lat().degrees, c.lng().degrees) for c in corners]


def neighbours(path: str) -> list[str]:
    """Tokens of the four edge neighbours at the same level."""
    return [path_from_cell(c) for c in cell_from_path(path).get_edge_neighbors()]


def coarsened(cells: list[str], level: int | None) -> tuple[list[str], list[int]]:
    """The distinct cells at S2 `level` that hold `cells` (in order of first appearance), and for each cell the
    index of its coarse cell. A cell already at or above `level` stays itself; level None changes nothing. Lets a
    sensitive site report only a coarse region (federation.location_level)."""
    if level is None:
        return list(cells), list(range(len(cells)))
    coarse: list[str] = []
    index: list[int] = []
    for cell in cells:
        try:
            parsed = parse_cell(cell)
        except ValueError:
            raise ValueError(f"federation.location_level={level} needs S2 cells; client {cell!r} is not one") from None
        token = path_from_cell(parsed.parent(level)) if parsed.level() > level else path_from_cell(parsed)
        if token not in coarse:
            coarse.append(token)
        index.append(coarse.index(token))
    return coarse, index


def cell_longitude(token: str) -> float:
    """Longitude of a cell's centre (degrees), or 0 for a client id that is not an S2 cell (a camera cluster's)."""
    try:
        return parse_cell(token).to_lat_lng().lng().degrees
    except ValueError:
        return 0.0
