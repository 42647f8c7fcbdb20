"""``skyfall eval RUN``: image, distribution and geometry metrics of a run, with CSV/JSON/HTML reports."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro


@dataclass
class Eval:
    """Evaluate a run: render ground-truth views per altitude band, score PSNR/SSIM/LPIPS, CLIP-FID/CMMD and the DSM.

    Renders the held-out satellite views and the ground-truth view sets (TILE/gt/views/<set>: curriculum
    orbits and street level on synthetic tiles) with the latest checkpoint (or --ckpt, repeatable, e.g.
    a Stage 1 and a Stage 2 checkpoint to compare per altitude). Metrics whose weights are not in the
    local cache (LPIPS AlexNet, CLIP) are reported as unavailable with the reason; nothing is downloaded.
    Writes OUT/eval.json, OUT/summary.csv, OUT/views.csv, OUT/report.html and PNG grids.
    """

    run: Annotated[Path, tyro.conf.Positional]
    """Run directory (config.yml, ckpts/)."""
    out: Path | None = None
    """Output folder (default RUN/eval)."""
    gt: Path | None = None
    """Ground-truth views: a tile, its gt/ or gt/views folder, or one <set> folder (default: the run's tile)."""
    data: Path | None = None
    """Tile folder (default: `data` in RUN/config.yml)."""
    ckpt: tuple[Path, ...] = ()
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
    world_offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Added to world points before comparing with --gt-dsm (e.g. the UTM easting/northing of the ENU origin)."""
    lpips: bool = True
    """LPIPS (AlexNet) when its weights are available locally."""
    lpips_backbone: Path | None = None
    """torchvision AlexNet state dict (default: TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth)."""
    lpips_lin: Path | None = None
    """lpips v0.1 alex.pth linear heads (default: inside an installed lpips package)."""
    clip: bool = True
    """CLIP-FID and CMMD when the CLIP weights are available locally."""
    clip_fid_model: str = "openai/clip-vit-base-patch32"
    """CLIP model for CLIP-FID (clean-fid clip_vit_b_32): a cached Hugging Face id or a local folder."""
    clip_model: str = "openai/clip-vit-large-patch14-336"
    """CLIP model for CMMD (ViT-L/14-336): a cached Hugging Face id or a local folder."""

    def main(self) -> None:
        from skyfall.eval.report import markdown_table
        from skyfall.eval.runner import EvalOptions, evaluate_run

        opts = EvalOptions(
            run=self.run, out=self.out, gt=self.gt, data=self.data, ckpts=self.ckpt, embedding=self.embedding,
            device=self.device, sets=self.sets, max_views=self.max_views, satellite=self.satellite,
            geometry=self.geometry, geometry_views=self.geometry_views, gt_dsm=self.gt_dsm,
            world_offset=self.world_offset, lpips=self.lpips, lpips_backbone=self.lpips_backbone,
            lpips_lin=self.lpips_lin, clip=self.clip, clip_fid_model=self.clip_fid_model,
            cmmd_model=self.clip_model,
        )  # fmt: skip
        doc = evaluate_run(opts)
        print(markdown_table(doc))
        for k, v in doc["unavailable"].items():
            print(f"[eval] {k} unavailable: {v}")
        print(f"[eval] report: {Path(doc['out']) / 'report.html'} ({doc['wall_s']:.1f} s)")
