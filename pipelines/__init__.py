"""Generation pipelines over the `ldm` model core: text-to-image, image-to-image, inpainting."""

from pipelines.text_to_image import Generated, TextToImagePipeline

__all__ = ["Generated", "TextToImagePipeline"]
