"""Evaluation: image metrics (PSNR, SSIM, LPIPS), distribution metrics (CLIP-FID, CMMD), DSM geometry,
per-altitude-band grouping, and reports (``skyfall eval RUN``).

Modules: ``image_metrics``, ``distribution``, ``geometry``, ``truth`` (scoring against a
georeferenced truth DSM GeoTIFF), ``runner`` (``evaluate_run``), ``report``.
"""
