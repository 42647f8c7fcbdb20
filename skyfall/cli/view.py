"""``skyfall view RUN|FILE``: live view in the browser (viser; `pip install 'skyfall[viewer]'`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tyro


@dataclass
class View:
    """Open a live 3D view of a run (baked like `skyfall export`) or a .ply/.splat/.spz file in the browser.

    Needs the `viewer` extra (viser). Open the printed URL; Ctrl-C stops the server.
    """

    source: tyro.conf.Positional[Path]
    """Run directory or splat file (.ply, compressed .ply, .splat, .spz)."""
    port: int = 8080
    """HTTP port of the viewer."""
    host: str = "127.0.0.1"
    """Interface to listen on: 127.0.0.1 keeps the viewer on this machine (it has no authentication);
    0.0.0.0 opens it to the network (e.g. to view from another machine over a trusted network)."""
    embedding: str | None = None
    """Run only: appearance embedding ('mean' or an image index; default: the run's test_embedding)."""
    up: str | None = None
    """World up direction for the viewer camera, e.g. '+z' or '-y' (default: +z for runs, -y for files)."""

    def main(self) -> None:
        from skyfall.export.viewer import load_splats_any, serve

        splats, up = load_splats_any(self.source, self.embedding)
        serve(splats, up=self.up or up, port=self.port, host=self.host)
