"""Generation pipelines (text-to-image, image-to-image, inpainting) over the `ldm` model core; see issue #4."""
