"""Generation pipelines over the `ldm` model core: text-to-image, image-to-image, inpainting."""

from pipelines.settings import Generated
from pipelines.text_to_image import TextToImagePipeline

__all__ = ["Generated", "TextToImagePipeline"]
