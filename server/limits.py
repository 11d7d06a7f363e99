"""What one request may ask of the server, so that no request holds it for hours or exhausts its
memory: steps, sizes and image counts, the hires pass's too, ControlNet units and uploads."""

from dataclasses import dataclass

from ldm.errors import UserError
from pipelines.hires import hires_size
from pipelines.settings import GenerationConfig


class OverLimit(UserError):
    """A request over one of the server's limits (a 422 naming the field)."""


@dataclass(frozen=True)
class Limits:
    """Set on the command line (serve's --max-* flags)."""

    steps: int = 150  # of the first pass, and of the hires pass
    side: int = 2048  # pixels, each of width and height, the hires pass's output included
    images: int = 16  # batch_size x n_iter
    batch: int = 8
    body: int = 32 << 20  # bytes of a request body
    upload_pixels: int = 4096 * 4096  # of each uploaded image: init image, mask, control images
    controlnets: int = 3  # units per request (sd-webui-controlnet's default unit count)

    def check(self, config: GenerationConfig, units: int = 0) -> None:
        """The request's settings (and `units` ControlNet units), by A1111's field names. Checked
        before any image is decoded, and again once the model has filled in its default size."""
        for name, value, most in (
            ("steps", config.steps, self.steps),
            ("width", config.width, self.side),
            ("height", config.height, self.side),
            ("images", config.num_images, self.images),
            ("batch_size", config.batch_size, self.batch),
            ("hr_second_pass_steps", config.hires_steps, self.steps),
            ("alwayson_scripts.controlnet.args (units)", units, self.controlnets),
        ):
            if value is not None and value > most:
                raise OverLimit(f"{name}={value}: this server allows at most {most}")
        if config.hires_scale is not None and config.width is not None and config.height is not None:
            height, width = hires_size(config.height, config.width, config.hires_scale, 8)
            if max(height, width) > self.side:
                raise OverLimit(
                    f"hr_scale={config.hires_scale:g}: the hires pass would draw {width}x{height}; this server "
                    f"allows at most {self.side} a side"
                )
