"""``python -m skyfall`` is the same as the ``skyfall`` console script."""

from skyfall.cli import entrypoint

if __name__ == "__main__":
    entrypoint()
