"""Train a latent diffusion model on image-caption pairs. Not built yet: training lands with issue #5."""

import sys

if __name__ == "__main__":
    print(
        "train.py: training is not implemented yet (issue #5). "
        "For now `python -m ldm.describe sd15` builds a model and prints its architecture.",
        file=sys.stderr,
    )
    sys.exit(1)
