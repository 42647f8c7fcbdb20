"""Training: one loop (``loop.py``) that Stage 1 (``stage1.py``, one phase over the satellite views)
and Stage 2 (``stage2.py``, the Iterative Dataset Update's episode schedule) both drive."""
