"""``skyfall eval RUN``: image, distribution and geometry metrics of a run, with CSV/JSON/HTML reports."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

from skyfall.eval.options import EvalOptions


@dataclass
class Eval:
    """Evaluate a run: render ground-truth views per altitude band, score PSNR/SSIM/LPIPS/DreamSim, CLIP-FID/CMMD and the DSM.

    Renders the held-out satellite views and the ground-truth view sets (TILE/gt/views/<set>: curriculum
    orbits and street level on synthetic tiles) with the latest checkpoint (or --ckpt, repeatable, e.g.
    a Stage 1 and a Stage 2 checkpoint to compare per altitude). Metrics whose weights are not in the
    local cache (LPIPS AlexNet, DreamSim, CLIP) are reported as unavailable with the reason; nothing is
    downloaded.
    Writes OUT/eval.json, OUT/summary.csv, OUT/views.csv, OUT/report.html and PNG grids.
    `--dsm-truth FILE.tif` (or `truth_dsm` in the tile's prepare.json) scores the DSM against a
    georeferenced truth in any CRS (exact resampling, crop to the tile, NCC shift within +-5 cells and
    a vertical offset) and writes the difference map OUT/dsm_truth_diff_<ckpt>.tif/.png.
    """

    opts: Annotated[EvalOptions, tyro.conf.arg(name="")]

    def main(self) -> None:
        from skyfall.eval.report import markdown_table, protocol_lines
        from skyfall.eval.runner import evaluate_run

        opts = self.opts
        doc = evaluate_run(opts)
        print(markdown_table(doc))
        for line in protocol_lines(doc):
            print(f"[eval] {line}")
        for k, v in doc["unavailable"].items():
            print(f"[eval] {k} unavailable: {v}")
        print(f"[eval] report: {Path(doc['out']) / 'report.html'} ({doc['wall_s']:.1f} s)")
