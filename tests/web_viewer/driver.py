"""Headless-Chromium driver for the real-viewer test: serve the pages, load a splat file, screenshot.

Python ``playwright`` drives the *system* Chromium (``executable_path``; no browser download). The
pages import the viewer libraries from ``node_modules`` (``npm ci`` in this folder, done by .ci/run).
Splat files are served from a separate data folder under ``/data/``.
"""

from __future__ import annotations

import functools
import http.server
import io
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np

ROOT = Path(__file__).resolve().parent
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-unsafe-swiftshader",
    "--use-gl=angle",
    "--use-angle=swiftshader",
]
PACKAGES = ["playcanvas", "three", "@sparkjsdev/spark"]


def find_chromium() -> str | None:
    exe = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
    return exe if exe and os.path.isfile(exe) else None


def unavailable_reason() -> str | None:
    """Why the browser test cannot run here, or None when it can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Python playwright is not installed (pip install -e '.[dev]')"
    if find_chromium() is None:
        return "no system Chromium (apt-get install chromium, or set CHROMIUM_PATH); .ci/run installs it"
    missing = [p for p in PACKAGES if not (ROOT / "node_modules" / p / "package.json").exists()]
    if missing:
        return f"viewer npm packages missing in {ROOT / 'node_modules'}: {missing} (run `npm ci` there)"
    return None


class _Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".js": "text/javascript",
        ".mjs": "text/javascript",
        ".wasm": "application/wasm",
    }

    def __init__(self, *args, data_dir: str, **kwargs) -> None:  # noqa: ANN002, ANN003
        self.data_dir = data_dir
        super().__init__(*args, **kwargs)

    def translate_path(self, path: str) -> str:
        if path.startswith("/data/"):
            name = Path(path.split("?")[0]).name
            return str(Path(self.data_dir) / name)
        return super().translate_path(path)

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


class ViewerBrowser:
    """One HTTP server and one headless Chromium, reused for many screenshots."""

    def __init__(self, data_dir: str | Path) -> None:
        from playwright.sync_api import sync_playwright

        self.data_dir = Path(data_dir)
        handler = functools.partial(_Handler, directory=str(ROOT), data_dir=str(self.data_dir))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self._pw = sync_playwright().start()
        self._profile = tempfile.TemporaryDirectory()
        self.context = self._pw.chromium.launch_persistent_context(
            self._profile.name, executable_path=find_chromium(), headless=True, args=FLAGS
        )

    def close(self) -> None:
        try:
            self.context.close()
            self._pw.stop()
        finally:
            self.server.shutdown()
            self._profile.cleanup()

    def shoot(
        self,
        page_name: str,
        file_name: str,
        camera: dict,
        width: int,
        height: int,
        *,
        timeout_s: float = 60.0,
        frames_after_load: int = 4,
    ) -> tuple[np.ndarray, dict]:
        """Load /data/<file_name> in www/<page_name> with ``camera`` (eye/target/up/fov in file
        coordinates) and return the screenshot as float RGB [H, W, 3] in [0, 1], plus page timings."""
        from PIL import Image
        from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

        fmt = ",".join
        query = (
            f"file={quote('/data/' + file_name)}&w={width}&h={height}"
            f"&eye={fmt(f'{v:.6f}' for v in camera['eye'])}&target={fmt(f'{v:.6f}' for v in camera['target'])}"
            f"&up={fmt(f'{v:.6f}' for v in camera['up'])}&fov={camera['fov']:.6f}"
            f"&near={camera.get('near', 0.05)}&far={camera.get('far', 5000)}"
        )
        url = f"http://127.0.0.1:{self.server.server_address[1]}/www/{page_name}?{query}"
        t0 = time.time()
        page = self.context.new_page()
        page.set_viewport_size({"width": width, "height": height})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            page.goto(url)
            deadline = time.time() + timeout_s
            k = frames_after_load
            img = None
            for _attempt in range(4):
                while True:  # short waits so that page errors fail fast
                    try:
                        page.wait_for_function(
                            "k => { const p = window.__probe; return p && (p.status === 'error' || "
                            "(p.status === 'loaded' && p.framesAtLoad !== undefined && p.frames >= p.framesAtLoad + k)); }",
                            arg=k,
                            timeout=1000,
                        )
                        break
                    except PlaywrightTimeoutError:
                        if errors:
                            raise RuntimeError(f"{page_name}: page error: {'; '.join(errors)}") from None
                        if time.time() > deadline:
                            raise TimeoutError(
                                f"{page_name}: {file_name} not rendered within {timeout_s} s"
                            ) from None
                probe = page.evaluate("() => window.__probe")
                if probe["status"] == "error":
                    raise RuntimeError(f"{page_name}: {'; '.join(probe['errors'])}")
                page.evaluate("() => { window.__freeze = true; }")
                png = page.screenshot(type="png")
                img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32) / 255.0
                if img.max() > 0.1:  # the sort worker can leave the first frames after load empty
                    break
                page.evaluate("() => { window.__freeze = false; if (window.__resume) window.__resume(); }")
                k += 5
            probe["seconds"] = round(time.time() - t0, 2)
            return img, probe
        finally:
            page.close()
