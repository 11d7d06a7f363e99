"""Generate images from prompts. Not built yet: text-to-image sampling lands with issue #4."""

import sys

if __name__ == "__main__":
    print(
        "sample.py: sampling is not implemented yet (issue #4). "
        "For now `python -m ldm.describe sd15` builds a model and prints its architecture.",
        file=sys.stderr,
    )
    sys.exit(1)
