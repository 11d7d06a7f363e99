"""TrainConfig: a YAML recipe over typed defaults, with dotted overrides from the command line;
frozen once loaded and checked.

    python train.py --config configs/shapes-diffusion.yaml optim.learning_rate=2e-4 steps.max=500

OmegaConf checks names and types against these dataclasses; `load_config` turns what it finds
wrong into one line that names the key.
"""

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from diffusers.optimization import SchedulerType
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.errors import ConfigError
from ldm.files import writing
from ldm.images import opened


@dataclass(frozen=True)
class ModelConfig:
    preset: str | None = None  # build from scratch: a name in ldm/presets/ or a .yaml
    pretrained: str | None = None  # or start from a model folder / hub id (fine-tuning)
    vae: str | None = None  # a model folder whose VAE replaces the preset's (the autoencoder stage's output)


@dataclass(frozen=True)
class DataConfig:
    path: str = MISSING
    resolution: int = 64
    caption_column: str = "text"  # metadata.jsonl/.csv and .json captions in shards
    center_crop: bool = True
    random_flip: bool = False
    num_workers: int = 0
    cache_latents: bool = False  # diffusion stage: encode images (and captions, if frozen) once, reuse
    cache_dir: str = "~/.cache/ldm-toolkit"
    caption_extension: str = ".txt"  # folders: NAME.png's caption is NAME + this
    buckets: bool = False  # aspect-ratio buckets of about resolution² pixels, instead of square crops
    bucket_step: int = 64  # bucket sides are multiples of this (64 for SD: 8 latent pixels)
    upscale: bool = False  # enlarge images smaller than their bucket (or the square) instead of skipping them
    shuffle_tags: bool = False  # comma-separated tags shuffled each step, after the first keep_tokens
    keep_tokens: int = 0


@dataclass(frozen=True)
class DiffusionConfig:
    prediction_type: str | None = None  # epsilon or v_prediction; default: the model's scheduler's
    train_text_encoder: bool = False  # jointly (from scratch) or frozen (pretrained)
    caption_dropout: float = 0.1  # the empty prompt instead, so classifier-free guidance works
    high_noise_bias: float = 1.0  # the noisiest quarter of timesteps drawn this many times as often
    grounding_loss: float = 0.0  # weight of the loss that puts words' attention in their .boxes.json boxes


@dataclass(frozen=True)
class LossConfig:
    """The diffusion loss's options, named as diffusers' and kohya's training scripts name them."""

    min_snr_gamma: float | None = None  # Min-SNR weighting, min(SNR, γ)/SNR (5.0 is the paper's choice)
    noise_offset: float = 0.0  # ε + noise_offset · N(0, 1) per image and channel: very dark and bright images
    masked: bool = False  # weight each pixel by its mask: NAME_mask.png beside NAME.png, else the alpha channel


@dataclass(frozen=True)
class LoraConfig:
    """stage: lora. Low-rank adapters (peft) on the named modules; the base weights stay frozen."""

    rank: int = 16
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0
    # UNet module names, matched at the end of the path as peft matches them: the attention
    # projections by default; add ff.net.0.proj and ff.net.2 (feed-forward), proj_in and proj_out,
    # conv1 and conv2 (the ResNet convolutions, LoCon-style).
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    text_encoder: bool = False  # adapters on the text encoder too, at optim.text_encoder_lr
    text_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    format: str = "kohya"  # lora.safetensors keys: kohya (A1111, ComfyUI, diffusers read it) or diffusers


@dataclass(frozen=True)
class TextualInversionConfig:
    """stage: textual_inversion. A new word's vectors, learned with the model frozen; written as
    OUTPUT_DIR/TOKEN.safetensors, the file A1111 (and sample.py --embeddings) reads as that word."""

    token: str | None = None  # the new word as the captions write it, e.g. "<rose>"
    init_word: str = "*"  # its vectors start as this text's token embeddings (A1111's initialization text)
    vectors: int = 1  # places the word takes in a prompt (A1111's "number of vectors per token")


@dataclass(frozen=True)
class DreamBoothConfig:
    """DreamBooth (stage diffusion or lora): every training image captioned by the instance prompt,
    and prior preservation: the base model's own images of the class prompt trained alongside."""

    instance_prompt: str | None = None  # e.g. "a photo of sks dog"; default: the images' own captions
    class_prompt: str | None = None  # e.g. "a photo of a dog"; set it to turn prior preservation on
    class_images: int = 100  # drawn by the base model once, then reused
    class_dir: str | None = None  # where they are kept; default DATA.CACHE_DIR/class-images/<prompt, model, size>
    prior_loss_weight: float = 1.0  # the class images' loss, relative to the instance images'


@dataclass(frozen=True)
class AutoencoderConfig:
    loss: str = "l1"  # l1 or mse
    kl_weight: float = 1e-6
    holdout: int = 8  # images kept out of training to measure reconstruction PSNR


@dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-4
    text_encoder_lr: float | None = None  # a jointly trained text encoder's own rate; default learning_rate
    lr_scheduler: str = "constant"  # any of diffusers.optimization's: linear, cosine, constant_with_warmup, ...
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    use_8bit_adam: bool = False  # bitsandbytes, CUDA only


@dataclass(frozen=True)
class StepsConfig:
    max: int = 1000
    batch_size: int = 8  # per process
    gradient_accumulation: int = 1
    mixed_precision: str = "no"  # no, fp16, bf16
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.mixed_precision == "False":  # YAML reads a bare `no` as false
            object.__setattr__(self, "mixed_precision", "no")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500
    keep: int = 3
    resume: str | None = None  # "latest" or a checkpoint folder


@dataclass(frozen=True)
class ValidationConfig:
    prompts: list[str] = field(default_factory=list)
    control_images: list[str] = field(default_factory=list)  # stage controlnet: one per prompt, in order
    every: int = 500
    steps: int = 25
    guidance_scale: float = 5.0
    seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = MISSING
    stage: str = "diffusion"  # diffusion, autoencoder, lora (adapters on a model), textual_inversion, controlnet
    seed: int = 0
    ema_decay: float | None = 0.999  # EMA of the trained model's weights; null for none
    log_every: int = 10
    report_to: str = "tensorboard"  # tensorboard, wandb or none
    save_precision: str = "fp32"  # the final model's weights on disk: fp32, fp16 (half the size) or bf16
    save_single_file: bool = False  # also OUTPUT_DIR/model.safetensors, original layout (a LoRA merged in)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    textual_inversion: TextualInversionConfig = field(default_factory=TextualInversionConfig)
    dreambooth: DreamBoothConfig = field(default_factory=DreamBoothConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: StepsConfig = field(default_factory=StepsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self) -> None:
        """Every check that needs only the recipe, so a mistake costs no model building."""
        choices = {
            "stage": (self.stage, ("diffusion", "autoencoder", "lora", "textual_inversion", "controlnet")),
            "lora.format": (self.lora.format, ("kohya", "diffusers")),
            "report_to": (self.report_to, ("tensorboard", "wandb", "none")),
            "steps.mixed_precision": (self.steps.mixed_precision, ("no", "fp16", "bf16")),
            "save_precision": (self.save_precision, ("fp32", "fp16", "bf16")),
            "autoencoder.loss": (self.autoencoder.loss, ("l1", "mse")),
            "diffusion.prediction_type": (self.diffusion.prediction_type, (None, "epsilon", "v_prediction")),
        }
        for key, (value, valid) in choices.items():
            if value not in valid:
                raise ConfigError(f"{key}={value!r}: use one of {', '.join(str(v) for v in valid if v)}")
        if self.optim.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("optim.use_8bit_adam=true: pip install bitsandbytes")
        if self.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
            raise ConfigError("report_to=wandb: wandb is not installed (pip install wandb), or use tensorboard")
        if (self.model.preset is None) == (self.model.pretrained is None):
            raise ConfigError("model: set exactly one of model.preset (from scratch) and model.pretrained (fine-tune)")
        positive = {"steps.max": self.steps.max, "steps.batch_size": self.steps.batch_size,
                    "steps.gradient_accumulation": self.steps.gradient_accumulation,
                    "checkpoint.every": self.checkpoint.every, "checkpoint.keep": self.checkpoint.keep,
                    "data.resolution": self.data.resolution, "validation.every": self.validation.every}  # fmt: skip
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key}={value}: must be at least 1")
        schedules = [kind.value for kind in SchedulerType]
        if self.optim.lr_scheduler not in schedules:
            raise ConfigError(f"optim.lr_scheduler={self.optim.lr_scheduler!r}: use one of {', '.join(schedules)}")
        if not 0 <= self.diffusion.caption_dropout < 1:
            raise ConfigError(f"diffusion.caption_dropout={self.diffusion.caption_dropout}: must be in [0, 1)")
        if self.diffusion.grounding_loss < 0:
            raise ConfigError(f"diffusion.grounding_loss={self.diffusion.grounding_loss}: must be 0 or more")
        if self.diffusion.grounding_loss and self.steps.gradient_checkpointing:
            # A checkpointed block is recomputed in the backward pass without the probabilities taken from it.
            raise ConfigError("diffusion.grounding_loss: needs steps.gradient_checkpointing=false")
        self._check_lora()
        self._check_textual_inversion()
        self._check_controlnet()
        self._check_dreambooth()
        if self.data.cache_latents and self.stage == "autoencoder":
            raise ConfigError("data.cache_latents=true: for the diffusion stage (the autoencoder trains on pixels)")
        if self.data.shuffle_tags and self.data.cache_latents and not self.text_trains:
            raise ConfigError("data.shuffle_tags=true: the captions change every step, so their embeddings cannot be "
                              "cached; set data.cache_latents=false or train the text encoder")  # fmt: skip
        if self.data.buckets and not 8 <= self.data.bucket_step <= self.data.resolution:
            raise ConfigError(f"data.bucket_step={self.data.bucket_step}: between 8 and data.resolution")
        if self.data.keep_tokens < 0:
            raise ConfigError(f"data.keep_tokens={self.data.keep_tokens}: must be 0 or more")
        if not self.data.caption_extension.startswith("."):
            raise ConfigError(f"data.caption_extension={self.data.caption_extension!r}: starts with a dot, e.g. .txt")
        if self.data.cache_latents and (not self.data.center_crop or self.data.random_flip):
            raise ConfigError("data.cache_latents=true: needs data.center_crop=true and data.random_flip=false")
        if not self.diffusion.high_noise_bias > 0:
            raise ConfigError(f"diffusion.high_noise_bias={self.diffusion.high_noise_bias}: must be above 0")
        self._check_loss()
        self._check_optim()

    def _check_loss(self) -> None:
        loss = self.loss
        if loss.min_snr_gamma is not None and not loss.min_snr_gamma > 0:
            raise ConfigError(f"loss.min_snr_gamma={loss.min_snr_gamma}: must be above 0 (5.0 is usual), or null")
        if not loss.noise_offset >= 0:
            raise ConfigError(f"loss.noise_offset={loss.noise_offset}: must be 0 or more (0.05 to 0.1 is usual)")
        if self.stage == "autoencoder" and (loss.min_snr_gamma is not None or loss.noise_offset or loss.masked):
            raise ConfigError("loss: min_snr_gamma, noise_offset and masked are for the diffusion and lora stages")

    def _check_optim(self) -> None:
        optim = self.optim
        rates = {"optim.learning_rate": optim.learning_rate, "optim.text_encoder_lr": optim.text_encoder_lr}
        for name, rate in rates.items():
            if rate is not None and not (math.isfinite(rate) and rate > 0):
                raise ConfigError(f"{name}={rate}: must be a finite number above 0")
        if optim.warmup_steps < 0 or optim.weight_decay < 0 or not optim.max_grad_norm > 0:
            raise ConfigError(f"optim: warmup_steps={optim.warmup_steps} and weight_decay={optim.weight_decay} must "
                              f"be 0 or more, max_grad_norm={optim.max_grad_norm} above 0")  # fmt: skip

    def _check_dreambooth(self) -> None:
        dreambooth = self.dreambooth
        if (dreambooth.instance_prompt or dreambooth.class_prompt) and self.stage == "autoencoder":
            raise ConfigError("dreambooth: for the diffusion and lora stages")
        if dreambooth.class_prompt is None:
            return
        if dreambooth.class_prompt == dreambooth.instance_prompt:
            raise ConfigError("dreambooth.class_prompt: must differ from the instance prompt (a class image is "
                              "known by its caption)")  # fmt: skip
        if dreambooth.class_images < 1:
            raise ConfigError(f"dreambooth.class_images={dreambooth.class_images}: must be at least 1")
        if dreambooth.prior_loss_weight < 0:
            raise ConfigError(f"dreambooth.prior_loss_weight={dreambooth.prior_loss_weight}: must be 0 or more")
        if self.data.shuffle_tags:
            raise ConfigError("dreambooth.class_prompt: needs data.shuffle_tags=false (the class images are known "
                              "by their caption)")  # fmt: skip

    @property
    def text_trains(self) -> bool:
        """Whether the captions' embeddings change in training (the text encoder trained jointly or
        through its LoRA adapters, or a new word's vectors), so they cannot be cached."""
        if self.stage == "textual_inversion":
            return True
        return self.lora.text_encoder if self.stage == "lora" else self.diffusion.train_text_encoder

    def _check_textual_inversion(self) -> None:
        if self.stage != "textual_inversion":
            return
        inversion = self.textual_inversion
        if self.model.pretrained is None:
            raise ConfigError("stage=textual_inversion: teaches a trained model a word; set model.pretrained")
        if not inversion.token or not inversion.token.strip() or any(c in inversion.token for c in "/\\"):
            raise ConfigError(f"textual_inversion.token={inversion.token!r}: set the new word, e.g. <rose> "
                              "(it names the file, so no slashes)")  # fmt: skip
        if not 1 <= inversion.vectors <= 75:
            raise ConfigError(f"textual_inversion.vectors={inversion.vectors}: 1 to 75 (a chunk holds 75 tokens)")
        if self.diffusion.train_text_encoder:
            raise ConfigError("stage=textual_inversion: the model stays frozen; not diffusion.train_text_encoder")

    def _check_controlnet(self) -> None:
        validation = self.validation
        if self.stage != "controlnet":
            if validation.control_images:
                raise ConfigError("validation.control_images: for stage=controlnet")
            return
        if self.model.pretrained is None:
            raise ConfigError("stage=controlnet: trains a ControlNet for a trained model; set model.pretrained")
        for key, value in (("diffusion.train_text_encoder", self.diffusion.train_text_encoder),
                           ("diffusion.grounding_loss", self.diffusion.grounding_loss),
                           ("dreambooth.instance_prompt", self.dreambooth.instance_prompt),
                           ("dreambooth.class_prompt", self.dreambooth.class_prompt)):  # fmt: skip
            if value:
                raise ConfigError(f"stage=controlnet: the model stays frozen and each image keeps its caption; "
                                  f"not {key}")  # fmt: skip
        if len(validation.control_images) != len(validation.prompts):
            raise ConfigError(f"validation.control_images: one per validation prompt ({len(validation.prompts)}), "
                              f"not {len(validation.control_images)}")  # fmt: skip
        for path in validation.control_images:
            if not Path(path).expanduser().is_file():
                raise ConfigError(f"validation.control_images: {path}: no such file")
            with opened(Path(path).expanduser(), f"validation.control_images: {path}"):
                pass  # its header: a readable image of a size decoded here

    def _check_lora(self) -> None:
        if self.stage != "lora":
            return
        lora = self.lora
        if self.model.pretrained is None:
            raise ConfigError("stage=lora: adapts a trained model; set model.pretrained")
        if lora.rank < 1:
            raise ConfigError(f"lora.rank={lora.rank}: must be at least 1")
        if not lora.alpha > 0:
            raise ConfigError(f"lora.alpha={lora.alpha}: must be above 0")
        if not 0 <= lora.dropout < 1:
            raise ConfigError(f"lora.dropout={lora.dropout}: must be in [0, 1)")
        if not lora.targets:
            raise ConfigError("lora.targets: name at least one UNet module, e.g. [to_q, to_k, to_v, to_out.0]")
        if self.diffusion.train_text_encoder:
            raise ConfigError("stage=lora: the text encoder gets adapters with lora.text_encoder=true, "
                              "not diffusion.train_text_encoder")  # fmt: skip


def load_config(path: str | Path, overrides: list[str]) -> TrainConfig:
    """The recipe at `path` with `key=value` overrides, checked; ConfigError names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        recipe = OmegaConf.load(path)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"--config {path}: not valid YAML ({_yaml_problem(error)})") from None
    if not isinstance(recipe, DictConfig):
        raise ConfigError(f"--config {path}: a recipe is a mapping of sections (model:, data:, ...), not a list")
    changes = []
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"{override!r}: overrides are dotted.key=value")
        try:
            changes.append(OmegaConf.from_dotlist([override]))
        except (yaml.YAMLError, OmegaConfBaseException) as error:
            raise ConfigError(f"{override!r}: not a valid value ({_yaml_problem(error)})") from None
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), recipe, *changes))
    except OmegaConfBaseException as error:
        raise ConfigError(describe_error(error)) from None


def _yaml_problem(error: Exception) -> str:
    """A YAML parser's multi-line report as a few words: what it expected, and where in the file."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    in_file = mark is not None and mark.name != "<unicode string>"  # an override is one line: no line number
    return f"{problem}, line {mark.line + 1}" if in_file else problem


RENAMED = {"diffusion.snr_gamma": "loss.min_snr_gamma", "diffusion.noise_offset": "loss.noise_offset"}


def describe_error(error: OmegaConfBaseException) -> str:
    """OmegaConf's multi-line report as one line: the key, and what was wrong with it."""
    key = getattr(error, "full_key", None) or "config"
    message = str(error).splitlines()[0]
    if "MissingMandatoryValue" in type(error).__name__ or "Missing mandatory value" in message:
        return f"{key}: required, and not set"
    if "not in" in message and "Key" in message:
        if key in RENAMED:
            return f"{key}: now {RENAMED[key]}"
        parent = key.rpartition(".")[0]
        node = OmegaConf.structured(TrainConfig)
        valid = sorted((OmegaConf.select(node, parent) if parent else node).keys())
        return f"{key}: unknown key; valid here: {', '.join(valid)}"
    return f"{key}: {message}"


def save_config(config: TrainConfig, path: Path) -> None:
    with writing(path, replace=True) as partial:
        partial.write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))
