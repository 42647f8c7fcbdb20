"""On-disk formats: checkpoints and PLY files."""
