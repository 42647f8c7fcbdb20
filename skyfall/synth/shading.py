"""Procedural materials and lighting of the synthetic city.

Textures are structured (window grids, lane markings, roof parapets, pavement joints) with soft
edges (linear ramps ~0.15-0.3 m wide) and no per-pixel noise: they carry the detail that matters from
the ground, while staying learnable from 0.5 m/px satellite views without heavy aliasing.

Box textures are computed in the box's own frame (``box_frame``: the hit point and normal turned back
by the box's yaw), so window grids, roof rims and car windows follow turned buildings and cars.
"""

from __future__ import annotations

import torch
from torch import Tensor

from skyfall.synth.layout import KIND_BUILDING, KIND_CAR, KIND_EQUIPMENT, KIND_GROUND, Layout
from skyfall.synth.lighting import Lighting
from skyfall.synth.raycast import turn_xy

_ASPHALT = (0.27, 0.27, 0.29)
_WHITE = (0.86, 0.86, 0.82)
_YELLOW = (0.86, 0.70, 0.22)
_SIDEWALK = (0.62, 0.61, 0.58)
_CONCRETE = (0.52, 0.51, 0.47)
_GRASS = (0.30, 0.46, 0.21)
_GLASS = (0.17, 0.22, 0.29)
_CAR_GLASS = (0.08, 0.10, 0.12)


def _c(rgb: tuple[float, float, float]) -> Tensor:
    return torch.tensor(rgb, dtype=torch.float32)


def band(x: Tensor, half_width: float | Tensor, soft: float = 0.15) -> Tensor:
    """1 where |x| < half_width, falling linearly to 0 over ``soft`` metres (a pre-filtered box)."""
    return ((half_width + 0.5 * soft - x.abs()) / soft).clamp(0.0, 1.0)


def _periodic(x: Tensor, period: float | Tensor) -> Tensor:
    """Signed distance to the nearest multiple of ``period``."""
    return x - torch.round(x / period) * period


def _mix(a: Tensor, b: Tensor | tuple, w: Tensor) -> Tensor:
    b = _c(b) if isinstance(b, tuple) else b
    return a + (b - a) * w[:, None]


def ground_albedo(layout: Layout, x: Tensor, y: Tensor) -> Tensor:
    """[R, 3] albedo of the ground plane at (x, y): lots, parks, pavements, roads with markings."""
    n = x.shape[0]
    col = _c(_CONCRETE).expand(n, 3).clone()
    seams = torch.maximum(band(_periodic(x, 6.0), 0.1), band(_periodic(y, 6.0), 0.1))
    col = col * (1.0 - 0.12 * seams)[:, None]
    for x0, y0, x1, y1 in layout.parks.tolist():
        inside = ((x > x0) & (x < x1) & (y > y0) & (y < y1)).float()
        grass = _c(_GRASS) * (1.0 + 0.07 * torch.sin(x * (torch.pi / 3.0)))[:, None]  # mowing stripes
        col = _mix(col, grass, inside)
    sw = layout.sidewalk_m
    for r in layout.roads:
        a = (x if r.axis == 0 else y) - r.centre
        along = y if r.axis == 0 else x
        pave = band(a, r.half_width + sw, 0.2)
        joints = band(_periodic(along, 2.0), 0.06, 0.12)
        col = _mix(col, _c(_SIDEWALK) * (1.0 - 0.1 * joints)[:, None], pave)
        kerb = band(a.abs() - r.half_width - 0.15, 0.15)
        col = _mix(col, (0.72, 0.71, 0.68), kerb * pave)
    crossing_any = torch.zeros(n)
    for r in layout.roads:
        a = (x if r.axis == 0 else y) - r.centre
        along = y if r.axis == 0 else x
        road = band(a, r.half_width, 0.1)
        asphalt = _c(_ASPHALT).expand(n, 3).clone()
        # Distance (along this road) to the edge of the nearest crossing road: markings stop there.
        gap = torch.full((n,), 1e9)
        for o in layout.roads:
            if o.axis != r.axis:
                gap = torch.minimum(gap, (along - o.centre).abs() - o.half_width)
        markings = gap > 4.5
        m = torch.zeros(n)
        if r.lanes == 2:
            dash = (_periodic(along, 6.0).abs() < 1.5).float()
            m = torch.maximum(m, band(a, 0.12) * dash)
        else:
            m_y = torch.maximum(band(a - 0.22, 0.1), band(a + 0.22, 0.1))
            asphalt = _mix(asphalt, _YELLOW, m_y * markings.float())
            dash = (_periodic(along, 9.0).abs() < 1.5).float()
            m = torch.maximum(m, torch.maximum(band(a - 3.5, 0.1), band(a + 3.5, 0.1)) * dash)
        m = torch.maximum(m, band(a.abs() - (r.half_width - 0.45), 0.1))  # edge lines
        m = m * markings.float()
        # Zebra crossings just before each intersection.
        zebra_zone = ((gap > 0.8) & (gap < 3.8)).float()
        zebra = band(_periodic(a, 1.2), 0.3) * zebra_zone * band(a, r.half_width - 0.6, 0.1)
        m = torch.maximum(m, zebra)
        asphalt = _mix(asphalt, _WHITE, m)
        col = _mix(col, asphalt, road * (1.0 - crossing_any))
        crossing_any = torch.maximum(crossing_any, road)
    return col


def facade_albedo(layout: Layout, box: Tensor, p: Tensor, n: Tensor) -> Tensor:
    """[R, 3] facade with a window grid: per building floor height and window spacing."""
    lo = torch.as_tensor(layout.box_lo, dtype=torch.float32)[box]
    hi = torch.as_tensor(layout.box_hi, dtype=torch.float32)[box]
    prm = torch.as_tensor(layout.box_params, dtype=torch.float32)[box]
    base = torch.as_tensor(layout.box_albedo, dtype=torch.float32)[box]
    floor_h, spacing, wf, hf = prm.unbind(-1)
    along_x = n[:, 1].abs() > 0.5
    s = torch.where(along_x, p[:, 0] - lo[:, 0], p[:, 1] - lo[:, 1])
    length = torch.where(along_x, hi[:, 0] - lo[:, 0], hi[:, 1] - lo[:, 1])
    # Centre the window columns on the wall so both corners get the same margin.
    ncol = torch.floor(length / spacing).clamp_min(1)
    sp = length / ncol
    u = _periodic(s - 0.5 * sp, sp)
    z = p[:, 2]
    zf = _periodic(z - 0.5 * floor_h, floor_h)
    win = band(u, 0.5 * wf * sp, 0.12) * band(zf, 0.5 * hf * floor_h, 0.12)
    # No windows in the parapet band or on the ground floor, which gets taller shop fronts instead.
    win = win * ((z < hi[:, 2] - 0.8) & (z > floor_h)).float()
    shop = band(z - 1.6, 1.1, 0.12) * band(u, 0.45 * sp, 0.12) * (hi[:, 2] > 8).float()
    win = torch.maximum(win, shop)
    glass = _c(_GLASS) * (1.0 + 0.15 * torch.cos(z * 0.9))[:, None]  # floors reflect slightly differently
    col = _mix(base, glass, win)
    cornice = band(z - (hi[:, 2] - 0.4), 0.4, 0.1)
    return col * (1.0 - 0.18 * cornice)[:, None]


def roof_albedo(layout: Layout, box: Tensor, p: Tensor) -> Tensor:
    """[R, 3] roof colour with a darker parapet rim and panel seams."""
    lo = torch.as_tensor(layout.box_lo, dtype=torch.float32)[box]
    hi = torch.as_tensor(layout.box_hi, dtype=torch.float32)[box]
    roof = torch.as_tensor(layout.box_roof, dtype=torch.float32)[box]
    edge = torch.minimum(
        torch.minimum(p[:, 0] - lo[:, 0], hi[:, 0] - p[:, 0]),
        torch.minimum(p[:, 1] - lo[:, 1], hi[:, 1] - p[:, 1]),
    )
    rim = band(edge, 0.6, 0.2)
    seams = torch.maximum(
        band(_periodic(p[:, 0] - lo[:, 0], 5.0), 0.08), band(_periodic(p[:, 1] - lo[:, 1], 5.0), 0.08)
    )
    col = roof * (1.0 - 0.08 * seams)[:, None]
    return _mix(col, roof * 0.62, rim)


def equipment_albedo(layout: Layout, box: Tensor, p: Tensor, n: Tensor) -> Tensor:
    """[R, 3] plain grey boxes with a dark fan disc on top (AC units)."""
    lo = torch.as_tensor(layout.box_lo, dtype=torch.float32)[box]
    hi = torch.as_tensor(layout.box_hi, dtype=torch.float32)[box]
    col = torch.as_tensor(layout.box_albedo, dtype=torch.float32)[box]
    c = 0.5 * (lo + hi)
    rad = torch.sqrt((p[:, 0] - c[:, 0]) ** 2 + (p[:, 1] - c[:, 1]) ** 2)
    fan = band(rad, 0.5 * torch.minimum(hi[:, 0] - lo[:, 0], hi[:, 1] - lo[:, 1]) * 0.6, 0.12)
    fan = fan * (n[:, 2] > 0.5).float()
    return col * (1.0 - 0.55 * fan)[:, None]


def car_albedo(layout: Layout, box: Tensor, p: Tensor, n: Tensor) -> Tensor:
    """[R, 3] car body colour with dark side windows and windscreens (box frame: length along x)."""
    lo = torch.as_tensor(layout.box_lo, dtype=torch.float32)[box]
    hi = torch.as_tensor(layout.box_hi, dtype=torch.float32)[box]
    col = torch.as_tensor(layout.box_albedo, dtype=torch.float32)[box]
    length = hi[:, 0] - lo[:, 0]
    u = p[:, 0] - 0.5 * (lo[:, 0] + hi[:, 0])  # along the car, 0 at its middle
    z = p[:, 2] - lo[:, 2]
    top = (n[:, 2] > 0.5).float()
    # Side windows: a band under the roof over the cabin; from above: windscreen and rear window.
    side = band(z - 0.78 * (hi[:, 2] - lo[:, 2]), 0.14, 0.06) * band(u, 0.3 * length, 0.1) * (1 - top)
    screens = band(u.abs() - 0.28 * length, 0.07 * length, 0.1) * top
    return _mix(col, _CAR_GLASS, torch.maximum(side, screens))


def crown_albedo(layout: Layout, ell: Tensor, n: Tensor) -> Tensor:
    """[R, 3] tree crowns: base green modulated by smooth leaf clumps on the normal sphere."""
    col = torch.as_tensor(layout.ell_albedo, dtype=torch.float32)[ell]
    az = torch.atan2(n[:, 1], n[:, 0])
    clumps = torch.sin(5 * az + 3 * n[:, 2]) * torch.sin(4 * n[:, 2] * torch.pi)
    return col * (0.9 + 0.12 * clumps)[:, None]


def box_frame(
    layout: Layout, box: Tensor, p: Tensor, n: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Hit points ``p`` [R, 3] (and normals ``n``) on boxes ``box`` [R], in each box's frame before its yaw.

    Points are turned back about the box's centre, so they can be compared with ``box_lo``/``box_hi``;
    rows of unturned boxes are returned untouched (bit for bit).
    """
    yaw = torch.as_tensor(layout.box_yaw, dtype=torch.float32)[box]
    turned = yaw != 0
    if not turned.any():
        return p, n
    b = box[turned]
    c = 0.5 * (
        torch.as_tensor(layout.box_lo, dtype=torch.float32)[b]
        + torch.as_tensor(layout.box_hi, dtype=torch.float32)[b]
    )
    cos, sin = torch.cos(-yaw[turned]), torch.sin(-yaw[turned])
    p = p.clone()
    p[turned] = c + turn_xy(p[turned] - c, cos, sin)
    if n is not None:
        n = n.clone()
        n[turned] = turn_xy(n[turned], cos, sin)
    return p, n


def surface_normals(layout: Layout, prim: Tensor, p: Tensor) -> Tensor:
    """[R, 3] outward unit normals at hit points ``p`` of primitives ``prim`` (all hits)."""
    nb = layout.box_lo.shape[0]
    is_box = prim < nb
    n = torch.zeros_like(p)
    if is_box.any():
        b = prim[is_box]
        q, _ = box_frame(layout, b, p[is_box])
        lo = torch.as_tensor(layout.box_lo, dtype=torch.float32)[b]
        hi = torch.as_tensor(layout.box_hi, dtype=torch.float32)[b]
        dist = torch.cat([(q - lo).abs(), (hi - q).abs()], 1)  # [R, 6]: the hit face is the nearest one
        face = dist.argmin(1)
        nn = torch.zeros_like(q)
        nn[torch.arange(len(q)), face % 3] = torch.where(face < 3, -1.0, 1.0)
        # The face normal back in the world: turned by the box's yaw (a no-op for unturned boxes).
        yaw = torch.as_tensor(layout.box_yaw, dtype=torch.float32)[b]
        turned = yaw != 0
        if turned.any():
            nn[turned] = turn_xy(nn[turned], torch.cos(yaw[turned]), torch.sin(yaw[turned]))
        n[is_box] = nn
    if (~is_box).any():
        e = prim[~is_box] - nb
        c = torch.as_tensor(layout.ell_center, dtype=torch.float32)[e]
        r = torch.as_tensor(layout.ell_radii, dtype=torch.float32)[e]
        n[~is_box] = torch.nn.functional.normalize((p[~is_box] - c) / r**2, dim=-1)
    return n


def albedo(layout: Layout, prim: Tensor, p: Tensor, n: Tensor) -> Tensor:
    """[R, 3] material colour at hit points (all hits)."""
    nb = layout.box_lo.shape[0]
    kind = torch.as_tensor(layout.box_kind)[prim.clamp_max(nb - 1)]
    is_box = prim < nb
    out = torch.as_tensor(layout.box_albedo, dtype=torch.float32)[prim.clamp_max(nb - 1)].clone()
    top = n[:, 2] > 0.5
    sel = is_box & (kind == KIND_GROUND) & top
    if sel.any():
        out[sel] = ground_albedo(layout, p[sel, 0], p[sel, 1])
    # Building, equipment and car textures live in their box's frame (the ground slab is never turned).
    pl, nl = p, n
    if layout.oriented:
        pl, nl = p.clone(), n.clone()
        pl[is_box], nl[is_box] = box_frame(layout, prim[is_box], p[is_box], n[is_box])
    sel = is_box & (kind == KIND_BUILDING) & top
    if sel.any():
        out[sel] = roof_albedo(layout, prim[sel], pl[sel])
    sel = is_box & (kind == KIND_BUILDING) & (n[:, 2].abs() < 0.5)
    if sel.any():
        out[sel] = facade_albedo(layout, prim[sel], pl[sel], nl[sel])
    sel = is_box & (kind == KIND_EQUIPMENT)
    if sel.any():
        out[sel] = equipment_albedo(layout, prim[sel], pl[sel], nl[sel])
    sel = is_box & (kind == KIND_CAR)
    if sel.any():
        out[sel] = car_albedo(layout, prim[sel], pl[sel], nl[sel])
    sel = ~is_box
    if sel.any():
        out[sel] = crown_albedo(layout, prim[sel] - nb, n[sel])
    return out


def shade(albedo_rgb: Tensor, n: Tensor, lit: Tensor, light: Lighting) -> Tensor:
    """[R, 3] Lambertian sun + ambient, then the date's tint and haze (see ``Lighting``)."""
    s = torch.as_tensor(light.sun_dir, dtype=torch.float32)
    ndl = (n @ s).clamp_min(0.0) * lit.float()
    # Ambient is a little lower on walls than on roofs: they see half the sky.
    amb = light.ambient * (0.8 + 0.2 * n[:, 2].clamp_min(0.0))
    rgb = albedo_rgb * (amb + light.sun * ndl)[:, None] * torch.tensor(light.tint, dtype=torch.float32)
    haze = torch.tensor(light.haze_color, dtype=torch.float32)
    return (rgb * (1.0 - light.haze) + haze * light.haze).clamp(0.0, 1.0)
