"""Options of ``skyfall eval`` (torch-free: the CLI builds its help from this dataclass)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import tyro

CLIP_FID_MODEL = "openai/clip-vit-base-patch32"
CMMD_MODEL = "openai/clip-vit-large-patch14-336"
DEFAULT_BAND_EDGES = (0.0, 10.0, 50.0, 100.0, 150.0, 200.0, 250.0, 300.0, 350.0)


@dataclass
class EvalOptions:
    """What to evaluate and how; the field docstrings are the ``skyfall eval`` help."""

    run: Annotated[Path, tyro.conf.Positional]
    """Run directory (config.yml, ckpts/)."""
    out: Path | None = None
    """Output folder (default RUN/eval)."""
    gt: Path | None = None
    """Ground-truth views: a tile, its gt/ or gt/views folder, or one <set> folder (default: the run's tile)."""
    data: Path | None = None
    """Tile folder (default: `data` in RUN/config.yml)."""
    ckpts: Annotated[tuple[Path, ...], tyro.conf.arg(name="ckpt")] = ()
    """Checkpoint(s) to evaluate (default: the latest in RUN/ckpts)."""
    embedding: str | None = None
    """Appearance embedding for novel views: 'mean' or an image index (default: the run's test_embedding)."""
    device: str = "cpu"
    """Torch device."""
    sets: tuple[str, ...] = ()
    """Only these GT view sets (default: all)."""
    max_views: int = 0
    """Views per set (0 = all)."""
    satellite: bool = True
    """Also score the held-out satellite views (transforms_test.json)."""
    geometry: bool = True
    """DSM metrics against the ground-truth DSM."""
    geometry_views: int = 5
    """Training satellite cameras back-projected for the reference-protocol DSM (0 = nadir render only)."""
    gt_dsm: Path | None = None
    """Ground-truth DSM: a DFC2019 <AOI>_DSM.tif (+ <AOI>_DSM.txt bounds; needs rasterio) or a synthetic tile."""
    dsm_truth: Path | None = None
    """Ground-truth DSM GeoTIFF in any CRS (heights above the WGS84 ellipsoid; a constant datum offset
    is absorbed by the registration). Our DSM is resampled exactly onto its grid, cropped to the tile,
    registered (NCC shift within +-dsm-shift-radius cells, vertical offset) and scored; writes
    OUT/dsm_truth_diff_<ckpt>.tif/.png. Default: `truth_dsm` in the tile's prepare.json, if any. A
    truth without a CRS is read in the tile's local ENU frame (synthetic tiles). Needs skyfall[geo]."""
    dsm_mask: Path | None = None
    """Mask GeoTIFF on the --dsm-truth grid: cells where it is 0 are not scored."""
    dsm_shift_radius: int = 5
    """--dsm-truth: NCC shift search range in truth cells (DFC2019 / EOGS: 5)."""
    dsm_oversample: int = 2
    """--dsm-truth: ENU render cells per truth cell along each axis before resampling."""
    world_offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Added to world points before comparing with --gt-dsm (e.g. the UTM easting/northing of the ENU origin)."""
    lpips: bool = True
    """LPIPS (AlexNet) when its weights are available locally."""
    lpips_backbone: Path | None = None
    """torchvision AlexNet state dict (default: TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth)."""
    lpips_lin: Path | None = None
    """lpips v0.1 alex.pth linear heads (default: inside an installed lpips package)."""
    dreamsim: bool = True
    """DreamSim (ensemble) when the dreamsim package and its weights are available locally."""
    dreamsim_cache: Path | None = None
    """DreamSim weights folder (the package's cache_dir; default: TORCH_HOME/hub/dreamsim)."""
    clip: bool = True
    """CLIP-FID and CMMD when the CLIP weights are available locally."""
    clip_fid_model: str = CLIP_FID_MODEL
    """CLIP model for CLIP-FID (clean-fid clip_vit_b_32): a cached Hugging Face id or a local folder."""
    cmmd_model: Annotated[str, tyro.conf.arg(name="clip-model")] = CMMD_MODEL
    """CLIP model for CMMD (ViT-L/14-336): a cached Hugging Face id or a local folder."""
    band_edges: tuple[float, ...] = DEFAULT_BAND_EDGES
    """Altitude band edges in metres for the per-altitude tables (above the last edge: its own band)."""
    embedders: Annotated[dict[str, Any], tyro.conf.Suppress] = field(default_factory=dict)
    """Preloaded embedders by metric name ("clip_fid", "cmmd": ClipEmbedder; "dreamsim": DreamSimMetric or its
    embed function); tests inject tiny encoders. Not a CLI option."""
