"""Where a city's files live: one folder holding the manifest, a tile and a run per cell, and the exports.

Layout::

    CITY/city.json           the manifest (``skyfall.city.manifest``)
    CITY/tiles/<cell>/       one tile per cell, in the reference tile format; its frame has the
                             city's ENU axes and its origin at ``cell.origin`` of the city frame
    CITY/runs/<cell>/        one run folder per cell (Stage 1, then Stage 2, as `skyfall train all`)
    CITY/tasks/<cell>/       `skyfall city train`'s record of each cell's task: its log, its starts
                             (a retried task adds one) and, once every stage is done, done.json
    CITY/export/             `skyfall city export`: the merged scene, per-tile chunks, the DSM mosaic
    CITY/gt/                 synthetic cities only: the exact city-wide DSM (``dsm.npy``, ``dsm.json``)

Tasks pass these paths, never arrays: every worker of a cluster reads and writes the city folder on
shared storage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from skyfall.city.manifest import MANIFEST_NAME, CityCell, CityManifest


@dataclass(frozen=True)
class CityFolder:
    """Paths of one city folder (nothing is created or read until asked)."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    def manifest(self) -> CityManifest:
        """Read ``city.json`` (CityManifestError naming the file and field when it is wrong)."""
        return CityManifest.from_json(self.manifest_path)

    def tile(self, cell: CityCell | str) -> Path:
        return self.root / "tiles" / _name(cell)

    def run(self, cell: CityCell | str) -> Path:
        return self.root / "runs" / _name(cell)

    def task(self, cell: CityCell | str) -> Path:
        return self.root / "tasks" / _name(cell)

    @property
    def export_dir(self) -> Path:
        return self.root / "export"

    @property
    def gt_dir(self) -> Path:
        return self.root / "gt"


def _name(cell: CityCell | str) -> str:
    return cell if isinstance(cell, str) else cell.name
