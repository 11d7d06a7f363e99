"""Generation pipelines over the `ldm` model core: text-to-image, image-to-image, inpainting.

`from pipelines import TextToImagePipeline` loads torch and the pipeline on first use, so that the
light modules here (choices, infotext) import without them."""

from typing import Any

__all__ = ["Generated", "TextToImagePipeline"]


def __getattr__(name: str) -> Any:
    if name == "TextToImagePipeline":
        from pipelines.text_to_image import TextToImagePipeline

        return TextToImagePipeline
    if name == "Generated":
        from pipelines.settings import Generated

        return Generated
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
