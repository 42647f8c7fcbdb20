"""Held-out view metrics of a scene: satellite test views and the synthetic tile's ground-truth orbits.

A held-out satellite view's acquisition lighting is unknowable from the training views, so its
appearance is either the novel-view embedding (as the reference evaluates) or an embedding fitted
on the left half of the image with the model frozen, PSNR then measured on the right half (the
NeRF-W / WildGaussians protocol).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from skyfall.data.camera_path import read_camera_path
from skyfall.data.cameras import Cameras
from skyfall.data.ground_truth import view_set_images
from skyfall.data.tile import Split
from skyfall.eval.image_metrics import psnr
from skyfall.scene import Scene

GT_ORBIT_45 = Path("gt") / "views" / "orbit_e45_r250"
"""The synthetic tile's 45-degree ground-truth orbit (the Stage 2 target view set)."""


def fit_embedding(
    scene: Scene,
    cam: Cameras,
    gt: Tensor,
    mask: Tensor,
    start: Tensor,
    *,
    steps: int,
    lr: float = 0.02,
    on_step: Callable[[], object] | None = None,
) -> Tensor:
    """An appearance embedding fitted to the ``mask`` pixels of one view, the model frozen.

    Args:
        scene: the scene (its appearance model must exist).
        cam: one camera.
        gt: [H, W, 3] target image in [0, 1].
        mask: [H, W] bool pixels used for the fit.
        start: [D] initial embedding.
        steps: Adam steps.
        lr: Adam learning rate.
        on_step: called after each step (a progress bar's update).
    """
    emb = start.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([emb], lr=lr)
    for _ in range(steps):
        out = scene.render(cam, emb, absgrad=False).colors[0]
        loss = ((out - gt) ** 2)[mask].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step()
    scene.model.zero_grad()
    scene.appearance.zero_grad(set_to_none=True)
    return emb.detach()


def heldout_psnr(
    scene: Scene,
    test: Split,
    *,
    embedding: Tensor | None,
    protocol: Literal["fit-left-half", "novel"] = "fit-left-half",
    fit_steps: int = 30,
    progress: bool = False,
) -> dict[str, float | None | list[float | None]]:
    """PSNR of the held-out satellite views.

    Returns ``psnr_test`` (by ``protocol``; 'novel' when the scene has no appearance model),
    ``psnr_test_novel_embedding`` (always the novel-view ``embedding`` on the whole view) and
    ``psnr_test_views`` (per view, the ``psnr_test`` protocol). A view with no scored pixel is None
    in ``psnr_test_views`` and left out of the means; a mean over no such view is None.
    ``progress`` shows a bar (fitting an embedding per view takes seconds each on a CPU).
    """
    from tqdm import tqdm

    device = scene.model.device
    novel, fitted = [], []
    fitting = protocol == "fit-left-half" and embedding is not None
    # one tick per render: the embedding fits (steps per view) are what takes the time
    total = len(test) * (1 + (fit_steps + 1 if fitting else 0))
    with tqdm(total=total, desc="eval held-out views", disable=not progress, leave=False) as bar:
        for i in range(len(test)):
            cam = test.cameras[i]
            gt = test.images[i].to(device).float() / 255.0
            mask = test.masks[i].to(device)
            with torch.no_grad():
                novel.append(psnr(scene.render(cam, embedding, absgrad=False).colors[0], gt, mask))
            bar.update(1)
            if fitting:
                left = torch.zeros_like(mask)
                left[:, : cam.width // 2] = True
                fit = fit_embedding(
                    scene, cam, gt, mask & left, embedding, steps=fit_steps, on_step=lambda: bar.update(1)
                )
                with torch.no_grad():
                    out = scene.render(cam, fit, absgrad=False)
                fitted.append(psnr(out.colors[0], gt, mask & ~left))
                bar.update(1)
    # A view whose scored pixels are empty (e.g. all its valid pixels lie in the fitted left half)
    # has no PSNR (NaN): it is reported as None and left out of the means.
    res: dict[str, float | None | list[float | None]] = {"psnr_test_novel_embedding": _finite_mean(novel)}
    res["psnr_test"] = _finite_mean(fitted) if fitted else res["psnr_test_novel_embedding"]
    res["psnr_test_views"] = [v if math.isfinite(v) else None for v in (fitted or novel)]
    return res


def _finite_mean(values: list[float]) -> float | None:
    """Mean of the finite values, None when there is none."""
    ok = [v for v in values if math.isfinite(v)]
    return float(np.mean(ok)) if ok else None


def read_image(path: Path, device: torch.device | str = "cpu") -> Tensor:
    """An image file -> [3, H, W] float in [0, 1]."""
    array = np.array(Image.open(path).convert("RGB"))  # a writable copy
    return torch.from_numpy(array).to(device).permute(2, 0, 1).float() / 255.0


@torch.no_grad()
def gt_orbit_psnr(
    scene: Scene, tile_dir: str | Path, embedding: Tensor | None, *, progress: bool = False
) -> float | None:
    """Mean PSNR over the synthetic tile's 45-degree ground-truth orbit; None when the tile has none."""
    from tqdm import tqdm

    root = Path(tile_dir) / GT_ORBIT_45
    if not (root / "camera_path.json").exists():
        return None
    cams = read_camera_path(root / "camera_path.json")
    files = view_set_images(root)
    vals = []
    for i in tqdm(range(len(cams)), desc="eval 45-degree orbit", disable=not progress, leave=False):
        out = scene.render(cams[i], embedding, absgrad=False)
        img = read_image(files[i], scene.model.device).permute(1, 2, 0)
        vals.append(psnr(out.colors[0], img))
    return float(np.mean(vals))
