"""``skyfall prepare``: satellite images with RPC camera models -> a tile."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import tyro


@dataclass
class PrepareOptions:
    """How each tile is prepared (`skyfall prepare`, and every cell of `skyfall city prepare`)."""

    alt_range: str | None = None
    """Scene heights 'min,max' in metres above the WGS84 ellipsoid (default: estimated from points
    triangulated on a coarse preview, 1st..99th percentile +- --alt-margin)."""
    alt_margin: float = 10.0
    """Metres added on both sides of the estimated height range."""
    downsample: int = 1
    """Integer box-downsampling factor of the written images."""
    stretch: str = "2,98"
    """Percentiles 'low,high' of valid pixels mapped to 1 and 255."""
    match: bool = True
    """Match features between all pairs of images (initial points, bundle adjustment)."""
    adjust: bool = True
    """Joint bundle adjustment of the RPCs from the tracks."""
    adjust_model: str = "offset"
    """RPC correction per image: 'offset' (image shift) or 'affine' (shift + 2x2 linear term)."""
    gauge: str = "view0"
    """'view0': image 0's RPC is kept and the others move; 'mean': all move, smallest corrections."""
    match_cell: int = 8
    """One keypoint per CELL x CELL pixels of each written image (matching time grows with
    (image side / CELL)² x the number of image pairs)."""
    track_merge_px: float = 0.0
    """Observations of one image closer than this (px) become one track node (0: no merging)."""
    dense: bool = True
    """Dense heights over the AOI (plane sweep over all training views + semi-global matching) for
    points3D.txt, instead of the matched points alone (a few seconds to a minute per 512² cells)."""
    dense_spacing: float = 2.0
    """Spacing (metres) of the points3D.txt grid taken from the dense heights."""
    dense_ground: float = 22.0
    """Window (metres) of the local ground under which raised dense points get a ground-layer point
    in points3D.txt, so that Stage 1 can show the floor where the heights read roof (0: no layer)."""
    dense_rematch: int = 3
    """Second dense match with this smaller NCC window (cells, odd), whose heights replace the main
    ones only where they are clearly lower and well matched: the alleys a 5-cell window lifts to the
    roof beside them (0: off; the dense step then takes about two thirds as long)."""
    dense_colour: float = 2.5
    """Colour weight of the dense match's shiftable windows: a cell prefers windows whose mean grey is
    its own, so a plain roof or crown does not take the height of the textured ground beside it (0: off)."""
    dense_quantile: float = 0.15
    """Height of each points3D.txt point from the dense heights where the cells it stands for hold a
    step (an outline): this quantile of them (0.5: their median, which the other points take; lower
    keeps fewer roofs spread over the ground beside them)."""
    dense_free_space: float = 0.5
    """Free-space carving of the dense heights: the NCC at which a view counts as seeing a cell, whose
    ray to that view then lowers every untrusted cell it passes under (the ground beside a wall that
    only one view sees, read at roof height; 0: off)."""
    dense_dsm: float = 0.5
    """Cell (metres) of the stereo DSM written from the dense heights: OUT/dense/dsm.tif (heights above
    the WGS84 ellipsoid in the tile's UTM zone, the grid of `export --format dsm`), score.tif (match
    score per cell), dsm.png, dsm.json (0: not written; needs skyfall[geo])."""
    test_views: str = "auto"
    """Held-out views for transforms_test.json: 'auto' (one in eight, at least one from 4 views,
    none below 4; with `prepare --dfc`, the dataset's test.txt when it has one), 'none', or indices
    like '2,5'."""

    def config(self, **kwargs: Any) -> Any:
        """The ``PrepareConfig`` of these options (ConfigError naming the option on bad input);
        ``kwargs`` set the fields these options do not hold (AOI, ...)."""
        from skyfall.errors import ConfigError
        from skyfall.prepare.dense import DenseConfig
        from skyfall.prepare.matching import MatchConfig
        from skyfall.prepare.pipeline import PrepareConfig, parse_range

        if self.match_cell < 2:
            raise ConfigError(f"--match-cell must be >= 2, got {self.match_cell}.")
        return PrepareConfig(
            alt_range=parse_range(self.alt_range, "--alt-range") if self.alt_range is not None else None,
            downsample=self.downsample,
            stretch=parse_range(self.stretch, "--stretch"),
            match=self.match,
            adjust=self.adjust,
            adjust_model=self.adjust_model,
            gauge=self.gauge,
            track_merge_px=self.track_merge_px,
            test_views=self.test_views,
            alt_margin=self.alt_margin,
            matcher=MatchConfig(cell=self.match_cell),
            dense=DenseConfig(
                enabled=self.dense,
                spacing=self.dense_spacing,
                ground_window=self.dense_ground,
                rematch_window=self.dense_rematch,
                point_quantile=self.dense_quantile,
                shift_colour=self.dense_colour,
                free_space=self.dense_free_space,
                dsm_resolution=self.dense_dsm,
            ),
            **kwargs,
        )


@dataclass
class Prepare:
    """Turn satellite images with RPCs (GeoTIFF/NITF tags, OSSIM .geom, .RPB, DIMAP XML) into a tile.

    Crops the area of interest, converts to a local ENU frame (metres), fits one pinhole camera per
    image to its RPC and reports the fit error, matches features between all pairs of images, chains
    them into tracks for a joint bundle adjustment of all RPCs and the initial points3D.txt, and
    writes images/, masks/, transforms_train.json, transforms_test.json (held-out views) and
    prepare.json. Without --aoi/--geojson the AOI is the largest square seen by every image; without
    --alt-range the heights come from points triangulated on a coarse preview.
    """

    out: Path
    """Tile directory to write."""
    images: Annotated[list[Path], tyro.conf.Positional] = field(default_factory=list)
    """Input images (view 0 is the adjustment's reference); none with --dfc."""
    aoi: str | None = None
    """Area of interest 'lon,lat,size_m' (degrees, degrees, metres; a square). Default: the largest
    square inside all images' common footprint, at most --max-aoi."""
    geojson: Path | None = None
    """Area of interest from a GeoJSON file (bounding square), instead of --aoi."""
    max_aoi: float = 1000.0
    """Side cap (metres) of the default AOI."""
    rpc: list[Path] = field(default_factory=list)
    """Explicit RPC files, one per image (default: embedded tags, then sidecars next to the image)."""
    dfc: Path | None = None
    """DFC2019 / Sat-NeRF dataset root: read ROOT/images/*/AOI_*.tif (or ROOT/images/AOI/*.tif), the
    Sat-NeRF RPC JSONs from ROOT/rpcs/AOI/ when present, and ROOT/truth/AOI/AOI_DSM.tif (or
    ROOT/truth/AOI_DSM.tif) as the truth DSM recorded in prepare.json. Needs --aoi-name."""
    aoi_name: str | None = None
    """Area name in the --dfc layout, e.g. JAX_068."""
    dsm_truth: Path | None = None
    """Ground-truth DSM GeoTIFF of the area (any CRS, heights above the WGS84 ellipsoid): recorded in
    prepare.json as `eval`'s default --dsm-truth, and the stereo DSM is scored against it (MAE after
    the DFC2019 registration). Overrides the truth --dfc finds."""
    overwrite: bool = False
    """Write into a non-empty OUT."""
    tile: Annotated[PrepareOptions, tyro.conf.OmitArgPrefixes] = field(default_factory=PrepareOptions)
    """How the tile is prepared."""

    def main(self) -> None:
        from skyfall.errors import ConfigError
        from skyfall.prepare.pipeline import parse_aoi, prepare_tile

        cfg = self.tile.config(
            aoi=parse_aoi(self.aoi) if self.aoi is not None else None,
            geojson=self.geojson,
            max_aoi=self.max_aoi,
            truth_dsm=self.dsm_truth,
        )
        images, rpcs, extra = list(self.images), self.rpc or None, None
        if self.dfc is not None or self.aoi_name is not None:
            from skyfall.prepare.dfc import dfc_inputs

            if self.dfc is None or self.aoi_name is None:
                raise ConfigError("--dfc ROOT and --aoi-name NAME go together.")
            if images or rpcs:
                raise ConfigError("give either image paths or --dfc ROOT --aoi-name NAME, not both.")
            images, rpcs, extra, test = dfc_inputs(self.dfc, self.aoi_name)
            if test is not None and cfg.test_views == "auto":
                cfg.test_views = ",".join(map(str, test)) or "none"  # the dataset's own split
        truth = None
        if self.dsm_truth is not None:  # read it now, not after minutes of matching; scored from memory
            from skyfall.eval.truth import load_truth

            truth = load_truth(self.dsm_truth.resolve())  # named as prepare.json records it
        s = prepare_tile(images, self.out, cfg, rpc_files=rpcs, overwrite=self.overwrite, extra=extra)
        dsm = stereo_outputs(self.out, s, self.tile.dense_dsm, truth=truth)
        print(format_summary(s, self.out, dsm))


def stereo_outputs(tile: Path, summary: dict, resolution: float, *, truth: Any = None) -> dict | None:
    """The tile's stereo DSM (``skyfall.export.stereo``), scored against its ``truth_dsm`` when it has
    one (``skyfall.eval.stereo``; ``truth``: that DSM already read, a ``GeoRaster``): what
    ``dense/dsm.json`` holds, ``{"written": False, "reason"}`` without rasterio / pyproj, None when
    there is nothing to write (no dense heights, or cell 0)."""
    if resolution <= 0 or not (summary.get("dense") or {}).get("done"):
        return None
    from skyfall.errors import MissingDependencyError
    from skyfall.eval.stereo import score_stereo
    from skyfall.export.stereo import write_stereo_dsm

    try:
        if truth is None and summary.get("truth_dsm"):
            truth = summary["truth_dsm"]
        scores = score_stereo(tile, truth) if truth is not None else None
        return {"written": True, **write_stereo_dsm(tile, resolution=resolution, truth_scores=scores)}
    except MissingDependencyError as e:  # the tile stands without it
        return {"written": False, "reason": str(e)}


def format_summary(s: dict, out: Path, dsm: dict | None = None) -> str:
    """The stdout report of ``skyfall prepare`` for a ``prepare.json`` summary (and ``stereo_outputs``)."""
    a = s["aoi"]
    lines = [
        f"tile {out}: {len(s['views'])} views at {s['width']}x{s['height']} px, AOI "
        f"{a['lon']:.6f},{a['lat']:.6f} {a['size_m']:g} m, heights {a['alt_range'][0]:g}..{a['alt_range'][1]:g} m",
        f"  AOI: {a['chosen_by']}",
        f"  heights: {a['alt_range_chosen_by']}",
    ]
    for v in s["views"]:
        lines.append(
            f"  {v['name']} ({v['split']}): pinhole vs RPC over the AOI: rms {v['check_rms_px']:.4f} px, max "
            f"{v['check_max_px']:.4f} px (projective with skew, fit grid: max {v['skewed_fit_max_px']:.4f} px); RPC from {v['rpc']}"
        )
        if v["aoi_inside_image"] < 0.995:
            lines.append(
                f"    note: {100 * (1 - v['aoi_inside_image']):.0f}% of the AOI is outside this image (masked)"
            )
    t = s["test_views"]
    lines.append(f"  held out: {', '.join(t['names']) or 'none'} ({t['rule']})")
    ba = s["bundle_adjustment"]
    fmt = lambda x, spec=".3f": "n/a" if x is None else format(x, spec)  # noqa: E731
    if ba["done"]:
        if ba.get("guide"):
            g = ba["guide"]
            lines.append(
                f"  guiding pass (all pairs, one keypoint per {g['cell']} px): {g['tracks']} tracks adjusted, "
                f"then every view's keypoints searched in all later views at once within {g['margin_px']:g} px "
                "of the corrected epipolar lines"
            )
        if ba.get("outliers"):
            o = ba["outliers"]
            lines.append(
                f"  outlier test: observations beyond {o['n_sigma']:g} sigma (sigma {fmt(o['sigma_px'])} px) left "
                f"out, {o['dropped']} in {o['rounds']} rounds"
            )
        hist = ", ".join(f"{n} views: {c}" for n, c in ba["track_length_histogram"].items())
        lines.append(
            f"  bundle adjustment ({ba['model']}, gauge {ba['gauge']}): {ba['tracks']} tracks ({hist}), "
            f"{ba['inliers']}/{ba['observations']} observations kept; reprojection rms "
            f"{fmt(ba['reproj_rms_before_px'])} -> {fmt(ba['reproj_rms_after_px'])} px, on tracks of >= 3 views "
            f"{fmt(ba['reproj_rms_tracks3_before_px'])} -> {fmt(ba['reproj_rms_tracks3_after_px'])} px"
        )
        for v, pv in zip(s["views"], ba["views"], strict=True):
            u, w = pv["offset_px"]
            lines.append(
                f"    {v['name']}: offset ({u:+.3f}, {w:+.3f}) px, rms {fmt(pv['rms_before_px'])} -> "
                f"{fmt(pv['rms_after_px'])} px over {pv['inliers']} observations"
            )
        sp = ba["pair_height_spread_m"]
        lines.append(
            f"    heights from different pairs of one track, median spread {fmt(sp['median_before'])} -> "
            f"{fmt(sp['median_after'])} m over {sp['tracks']} tracks; ray gap median "
            f"{fmt(ba['ray_gap_before_m']['median'])} -> {fmt(ba['ray_gap_m']['median'])} m"
        )
        for pair, p in ba["pairs"].items():
            if p["tracks3"]:
                lines.append(
                    f"    pair {pair}: median height vs all views {fmt(p['median_dz_before_m'], '+.3f')} -> "
                    f"{fmt(p['median_dz_after_m'], '+.3f')} m ({p['tracks3']} tracks of >= 3 views)"
                )
    else:
        lines.append(f"  no bundle adjustment ({ba['reason']}): the RPCs are used as delivered")
    d = s.get("dense") or {}
    if d.get("done"):
        lines.append(
            f"  dense heights: {d['cells'][1]}x{d['cells'][0]} cells of {d['resolution_m']:.2f} m, {d['planes']} planes "
            f"of {d['step_m']:.2f} m, median NCC {d['median_score']:.2f}, {d['seconds']:g} s"
            + (
                f"; free space lowered {d['free_space_lowered']:.1%} of the cells"
                if d.get("free_space_lowered")
                else ""
            )
            + (f" ({d['note']})" if d.get("note") else "")
        )
    if dsm is not None:
        lines.append("  stereo DSM: " + dsm_summary(dsm, out))
    lines.append(f"  points3D.txt: {s['points3D']['count']} points, {s['points3D']['method']}")
    if s.get("truth_dsm"):
        lines.append(f"  truth DSM: {s['truth_dsm']}")
    return "\n".join(lines)


def dsm_summary(dsm: dict, tile: Path) -> str:
    """What a report says of a tile's stereo DSM (``dense/dsm.json``, or why there is none) after
    'stereo DSM'."""
    if not dsm.get("written", True):
        return f"not written: {dsm.get('reason')}"
    line = (
        f"{tile / 'dense' / dsm['file']} ({dsm['grid']['resolution']:g} m cells, {dsm['crs']}, "
        f"completeness {dsm['completeness']:.3f})"
    )
    t = dsm.get("truth")
    if t and "error" in t:
        return line + f"; not scored against {t['file']}: {t['error']}"
    if t:
        line += (
            f"; against the truth DSM: MAE {t['dsm_mae_m']:.3f} m, RMSE {t['dsm_rmse_m']:.3f} m, completeness "
            f"{t['dsm_completeness']:.3f} (shift {t['shift_e_m']:+.2f} m E, {t['shift_n_m']:+.2f} m N, dz {t['dz_m']:+.2f} m)"
        )
    return line
