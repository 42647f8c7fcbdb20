"""DFC2019 / Sat-NeRF dataset layouts as ``skyfall prepare`` input (``--dfc ROOT --aoi-name AOI``).

Two layouts are recognised under ROOT, in this order:

1. Flat: ``images/AOI/*.tif``, ``rpcs/AOI/<image stem>.json`` (Sat-NeRF per-image JSON with an
   ``rpc`` object) and ``truth/AOI_DSM.tif`` (or ``truth/AOI/AOI_DSM.tif``).
2. Sat-NeRF / EO-NeRF: ``DFC2019/Track3-RGB-crops/AOI/*.tif`` (or ``Track3-NEW-crops``),
   ``root_dir/crops_rpcs_ba_v2/AOI/<image stem>.json`` (or ``root_dir/rpcs_ba``) and
   ``DFC2019/Track3-Truth/AOI_DSM.tif``.

The truth DSM's bounds file ``AOI_DSM.txt`` must sit next to it (``skyfall eval`` reads both).
When the JSON folder holds Sat-NeRF's ``test.txt`` (one JSON file name per line), those images
are the held-out views.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from skyfall.errors import ConfigError

_LAYOUTS = (
    ("images/{aoi}", ("rpcs/{aoi}",), ("truth/{aoi}_DSM.tif", "truth/{aoi}/{aoi}_DSM.tif")),
    (
        "DFC2019/Track3-RGB-crops/{aoi}",
        ("root_dir/crops_rpcs_ba_v2/{aoi}", "root_dir/rpcs_ba/{aoi}"),
        ("DFC2019/Track3-Truth/{aoi}_DSM.tif",),
    ),
    (
        "DFC2019/Track3-NEW-crops/{aoi}",
        ("root_dir/crops_rpcs_ba_v2/{aoi}", "root_dir/rpcs_ba/{aoi}"),
        ("DFC2019/Track3-Truth/{aoi}_DSM.tif",),
    ),
)


def dfc_inputs(root: str | Path, aoi: str) -> tuple[list[Path], list[Path], dict[str, Any], list[int] | None]:
    """Images, their RPC JSONs, prepare.json entries and held-out view indices of one area.

    Returns:
        (images sorted by name, one RPC JSON per image, ``{"truth_dsm": path, "dfc": {...}}``,
        indices listed in Sat-NeRF's ``test.txt`` or None when there is none).

    Raises:
        ConfigError: the root, the area, an image's RPC JSON or the truth DSM / its bounds file is missing.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"--dfc {root}: not a folder.")
    for layout in _LAYOUTS:
        img_dir = root / layout[0].format(aoi=aoi)
        if img_dir.is_dir():
            _, rpc_pats, truth_pats = layout
            break
    else:
        tried = ", ".join(str(root / p[0].format(aoi=aoi)) for p in _LAYOUTS)
        raise ConfigError(f"--dfc {root}: no image folder for area {aoi!r} (looked for {tried}).")
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in (".tif", ".tiff"))
    if not images:
        raise ConfigError(f"{img_dir}: no .tif images of area {aoi!r}.")
    rpc_dirs = [root / p.format(aoi=aoi) for p in rpc_pats]
    rpc_dir = next((d for d in rpc_dirs if d.is_dir()), None)
    if rpc_dir is None:
        raise ConfigError(
            f"--dfc {root}: no RPC folder for area {aoi!r} (looked for {', '.join(map(str, rpc_dirs))})."
        )
    rpcs = []
    for im in images:
        f = rpc_dir / f"{im.stem}.json"
        if not f.is_file():
            raise ConfigError(f"{f} [rpc]: missing: every image of {img_dir} needs its RPC JSON.")
        rpcs.append(f)
    truth = next((root / p.format(aoi=aoi) for p in truth_pats if (root / p.format(aoi=aoi)).is_file()), None)
    if truth is None:
        looked = ", ".join(str(root / p.format(aoi=aoi)) for p in truth_pats)
        raise ConfigError(f"--dfc {root}: no truth DSM for area {aoi!r} (looked for {looked}).")
    if not truth.with_suffix(".txt").is_file():
        raise ConfigError(
            f"{truth.with_suffix('.txt')} [bounds]: missing: the truth DSM needs its bounds file."
        )
    test = None
    test_txt = rpc_dir / "test.txt"
    if test_txt.is_file():
        names = {ln.strip() for ln in test_txt.read_text(encoding="utf-8").splitlines() if ln.strip()}
        stems = {Path(n).stem for n in names}
        unknown = sorted(stems - {im.stem for im in images})
        if unknown:
            raise ConfigError(f"{test_txt} [{unknown[0]}]: lists an image that is not in {img_dir}.")
        test = [i for i, im in enumerate(images) if im.stem in stems]
    extra = {
        "truth_dsm": str(truth.resolve()),
        "dfc": {"root": str(root.resolve()), "aoi_name": aoi, "images": str(img_dir), "rpcs": str(rpc_dir)},
    }
    return images, rpcs, extra, test
