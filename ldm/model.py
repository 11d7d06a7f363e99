"""LatentDiffusion: tokenizer, text encoder, UNet, VAE and noise schedule in one object, saved and
loaded in the diffusers `StableDiffusionPipeline` folder layout:

    model_index.json  unet/  vae/  text_encoder/  tokenizer/  scheduler/   (safetensors weights)
    sampling.json     (ours, optional; diffusers ignores it): the steps and guidance it draws best at

SDXL adds a second tokenizer and text encoder (`tokenizer_2/`, `text_encoder_2/`, OpenCLIP bigG
with its projection), in the `StableDiffusionXLPipeline` layout. The SDXL refiner has only that
second one (`text_encoder` and `tokenizer` null in its `StableDiffusionXLImg2ImgPipeline` index)
and conditions on an aesthetic score instead of the target size. What we save loads in diffusers'
`from_pretrained` of those pipelines, and we load what diffusers saves, from a folder or a hub id.
"""

import inspect
import json
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
import yaml
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, SchedulerMixin
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ldm.errors import ConfigError, UserError
from ldm.files import OutputExists, writing
from ldm.hub import download
from ldm.text import clip_tokenizer, save_tokenizer, text_state_for_files
from ldm.unet import UNet, UNetConfig

PRESET_DIR = Path(__file__).resolve().parent / "presets"  # package data: a plain `pip install .` has them
PARTS = {  # part -> (library, class) as model_index.json names them
    "text_encoder": ("transformers", "CLIPTextModel"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "scheduler": ("diffusers", None),  # any diffusers scheduler
}
TEXT_PARTS = ("text_encoder", "tokenizer")  # what the SDXL refiner lacks
SDXL_PARTS = {  # the second text encoder and its tokenizer, beside PARTS
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
    "tokenizer_2": ("transformers", "CLIPTokenizer"),
}
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
SAMPLING_FILE = "sampling.json"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # by the names configs use


def dtype_name(dtype: torch.dtype) -> str:
    """A precision by the name configs and flags use: torch.bfloat16 -> "bf16"."""
    return next(name for name, kind in DTYPES.items() if kind == dtype)


class ModelLoadError(UserError):
    """A model folder, hub id or preset that cannot be loaded; the message says which part and why."""


@dataclass(frozen=True)
class SamplingDefaults:
    """The sampling settings a model was validated with (training writes its recipe's validation
    steps and guidance); used when the user gives none. The scheduler is the model's own, scheduler/."""

    steps: int
    guidance_scale: float

    @classmethod
    def read(cls, path: Path) -> "SamplingDefaults":
        try:
            values = json.loads(path.read_text())
            return cls(steps=int(values["steps"]), guidance_scale=float(values["guidance_scale"]))
        except (ValueError, KeyError, TypeError) as error:
            raise ModelLoadError(f"{path}: not a sampling file ({type(error).__name__}: {error})") from None


@dataclass
class LatentDiffusion:
    """Everything text-to-image needs. The UNet is ours; the other parts are transformers' and
    diffusers'. An SDXL model has the second tokenizer and text encoder; the others have None there.
    The SDXL refiner has None for the first pair."""

    tokenizer: CLIPTokenizer | None
    text_encoder: CLIPTextModel | None
    unet: UNet
    vae: AutoencoderKL
    scheduler: SchedulerMixin
    sampling: SamplingDefaults | None = None  # None: the pipeline's defaults
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None
    # SDXL: with no negative prompt given, guide away from zeros rather than the empty prompt's
    # embedding (diffusers' StableDiffusionXLPipeline option of that name, true for SDXL base).
    force_zeros_for_empty_prompt: bool = False

    @property
    def is_sdxl(self) -> bool:
        """SDXL's base or refiner: a second text encoder, pooled text and size ids."""
        return self.text_encoder_2 is not None

    @property
    def is_refiner(self) -> bool:
        """SDXL's refiner: the second text encoder alone, and an aesthetic score among its time ids."""
        return self.is_sdxl and self.text_encoder is None

    def text_encoders(self) -> list[tuple[CLIPTokenizer, CLIPTextModel]]:
        """(tokenizer, text encoder) pairs, whose token embeddings are concatenated: one, or SDXL's two
        (the refiner: its one)."""
        pairs = [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]
        return [(tokenizer, encoder) for tokenizer, encoder in pairs if encoder is not None]

    @classmethod
    def from_preset(cls, preset: str | Path) -> "LatentDiffusion":
        """Random weights in a preset's architecture: a name in ldm/presets/ (tiny, sd15, sdxl, ...) or a .yaml."""
        return cls.from_spec(read_preset(preset))

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "LatentDiffusion":
        """Random weights from a preset's sections (unet, text_encoder, tokenizer, vae, scheduler; a
        refiner's: text_encoder_2 and tokenizer_2 in place of the first pair)."""
        refiner = "text_encoder_2" in spec and "text_encoder" not in spec
        missing = [part for part in PARTS if part not in spec and not (refiner and part in TEXT_PARTS)]
        if missing:
            raise ModelLoadError(f"model spec: missing section(s) {missing}")
        tokenizer, text_encoder = (None, None) if refiner else _text_part(spec, "", CLIPTextModel)
        vae_fields = inspect.signature(AutoencoderKL.__init__).parameters
        model = cls(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            unet=UNet(UNetConfig.from_diffusers(spec["unet"])),
            vae=AutoencoderKL(**_checked("vae", spec["vae"], vae_fields)),
            scheduler=_scheduler_from_config(spec["scheduler"]),
        )
        if "text_encoder_2" in spec:
            model.tokenizer_2, model.text_encoder_2 = _text_part(spec, "_2", CLIPTextModelWithProjection)
            model.force_zeros_for_empty_prompt = not refiner  # as the published base and refiner say
        check_text_widths(model)
        return model

    @classmethod
    def load(cls, source: str | Path, dtype: torch.dtype = torch.float32) -> "LatentDiffusion":
        """Load a diffusers-layout folder, or download one from the Hugging Face hub by id. `dtype`: the
        precision of the UNet and text encoders (a pipeline asks for the one it runs in, so the file's
        fp32 is never held whole beside it); the VAE loads in fp32, as a pipeline may keep it there."""
        folder = Path(source)
        if not folder.is_dir():
            folder = download(str(source), extra=(SAMPLING_FILE,))
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(f"{folder}: not a model folder (no model_index.json)")
        index = read_json(folder / "model_index.json")
        if not isinstance(index, dict):
            raise ModelLoadError(f"{folder / 'model_index.json'}: not a JSON object")
        sdxl = index.get("_class_name", "").startswith("StableDiffusionXL")
        refiner = sdxl and index.get("text_encoder", [None, None])[0] is None
        for part, (_, class_name) in (PARTS | (SDXL_PARTS if sdxl else {})).items():
            if refiner and part in TEXT_PARTS:
                continue
            if not (folder / part).is_dir():
                raise ModelLoadError(f"{folder}: the {part}/ part is missing")
            declared = index.get(part, [None, None])[1]
            if class_name is not None and declared != class_name:
                raise ModelLoadError(f"{folder}: {part} is {declared!r}; only {class_name} is supported")
        model = cls(
            tokenizer=None if refiner else CLIPTokenizer.from_pretrained(folder / "tokenizer"),
            text_encoder=None if refiner else _load_pretrained(CLIPTextModel, folder / "text_encoder", dtype),
            unet=_load_unet(folder / "unet", dtype),
            vae=_load_pretrained(AutoencoderKL, folder / "vae", torch.float32, low_cpu_mem_usage=False),
            scheduler=_scheduler_from_config(read_json(folder / "scheduler" / "scheduler_config.json")),
            sampling=SamplingDefaults.read(folder / SAMPLING_FILE) if (folder / SAMPLING_FILE).is_file() else None,
        )
        if sdxl:
            model.tokenizer_2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
            model.text_encoder_2 = _load_pretrained(CLIPTextModelWithProjection, folder / "text_encoder_2", dtype)
            model.force_zeros_for_empty_prompt = bool(index.get("force_zeros_for_empty_prompt", not refiner))
        check_text_widths(model)
        return model

    def save(self, directory: str | Path) -> None:
        """Write the diffusers layout to a new folder. It is written beside the target and renamed
        into place at the end, so an interrupted save leaves no half-written model."""
        directory = Path(directory)
        if directory.exists():
            raise OutputExists(f"{directory} already exists; choose a new folder")
        with writing(directory) as partial:
            self._write(partial)

    def _write(self, folder: Path) -> None:
        (folder / "unet").mkdir(parents=True)
        json.dump(self.unet.config.to_diffusers(), (folder / "unet" / "config.json").open("w"), indent=2)
        state = {k: v.contiguous() for k, v in self.unet.state_dict().items()}
        save_file(state, folder / "unet" / WEIGHTS_FILE, metadata={"format": "pt"})
        self.vae.save_pretrained(folder / "vae", safe_serialization=True)
        if not self.is_refiner:
            self.text_encoder.config.architectures = ["CLIPTextModel"]
            self.text_encoder.config.save_pretrained(folder / "text_encoder")
            text_state = text_state_for_files(self.text_encoder)
            save_file(text_state, folder / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
            save_tokenizer(self.tokenizer, folder / "tokenizer")
        self.scheduler.save_pretrained(folder / "scheduler")
        pipeline = "StableDiffusionXLPipeline" if self.is_sdxl else "StableDiffusionPipeline"
        pipeline = "StableDiffusionXLImg2ImgPipeline" if self.is_refiner else pipeline
        index: dict[str, Any] = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__}
        index |= {part: [library, class_name] for part, (library, class_name) in PARTS.items()}
        index["scheduler"] = ["diffusers", type(self.scheduler).__name__]
        if self.is_refiner:
            index |= {part: [None, None] for part in TEXT_PARTS} | {"requires_aesthetics_score": True}
        index |= {name: [None, None] for name in ("feature_extractor", "image_encoder")}
        if self.is_sdxl:  # its projection's keys already carry the "text_model." prefix the files use
            self.text_encoder_2.save_pretrained(folder / "text_encoder_2", safe_serialization=True)
            save_tokenizer(self.tokenizer_2, folder / "tokenizer_2")
            index |= {part: [library, class_name] for part, (library, class_name) in SDXL_PARTS.items()}
            index["force_zeros_for_empty_prompt"] = self.force_zeros_for_empty_prompt
        else:
            index |= {"safety_checker": [None, None], "requires_safety_checker": False}
        json.dump(index, (folder / "model_index.json").open("w"), indent=2)
        if self.sampling is not None:
            json.dump(asdict(self.sampling), (folder / SAMPLING_FILE).open("w"), indent=2)

    def spec(self) -> dict[str, Any]:
        """The preset sections that rebuild this architecture (from_spec's input), scheduler and
        latent scaling included: what a single file records so it loads as the folder did."""
        vae_fields = inspect.signature(AutoencoderKL.__init__).parameters
        spec = {
            "unet": self.unet.config.to_diffusers(),
            "vae": {key: value for key, value in self.vae.config.items() if key in vae_fields},
            "scheduler": {**self.scheduler.config, "_class_name": type(self.scheduler).__name__},
        }
        text_fields = set(CLIPTextConfig().to_dict()) - {"architectures", "dtype", "transformers_version"}
        for suffix, tokenizer, encoder in (("", self.tokenizer, self.text_encoder),
                                           ("_2", self.tokenizer_2, self.text_encoder_2)):  # fmt: skip
            if encoder is not None:
                config = encoder.config.to_diff_dict()
                spec[f"text_encoder{suffix}"] = {key: value for key, value in config.items() if key in text_fields}
                spec[f"tokenizer{suffix}"] = {
                    "pad_token": tokenizer.pad_token,
                    "model_max_length": tokenizer.model_max_length,
                }
        return json.loads(json.dumps(spec))  # plain lists and numbers, as a preset's YAML gives them

    def parts(self) -> dict[str, nn.Module]:
        """The parts with weights, by their folder names."""
        parts = {
            "text_encoder": self.text_encoder,
            "unet": self.unet,
            "vae": self.vae,
            "text_encoder_2": self.text_encoder_2,
        }
        return {name: part for name, part in parts.items() if part is not None}

    def text_parts(self) -> dict[str, nn.Module]:
        """The text encoders, by their folder names (`text_encoder`, SDXL's `text_encoder_2`)."""
        return {name: part for name, part in self.parts().items() if name.startswith("text_encoder")}


def check_text_widths(model: LatentDiffusion) -> None:
    """The UNet's cross-attention reads the (concatenated) token embeddings, and SDXL's added
    conditioning the second encoder's pooled projection and the time ids: their widths must agree."""
    unet = model.unet.config
    encoders = [encoder for _, encoder in model.text_encoders()]
    width = sum(encoder.config.hidden_size for encoder in encoders)
    if model.is_sdxl != (unet.addition_embed_type == "text_time"):
        raise ConfigError("an SDXL model (two text encoders) needs a UNet with addition_embed_type 'text_time', "
                          "and only it")  # fmt: skip
    if unet.cross_attention_dim != width:
        raise ConfigError(f"unet cross_attention_dim={unet.cross_attention_dim}, but the text is {width} wide")
    if model.is_sdxl:
        pooled = model.text_encoder_2.config.projection_dim
        ids, left = divmod(unet.projection_class_embeddings_input_dim - pooled, unet.addition_time_embed_dim)
        wanted = 5 if model.is_refiner else 6  # the refiner: an aesthetic score in place of the target size
        if left or ids != wanted:
            raise ConfigError(f"unet projection_class_embeddings_input_dim={unet.projection_class_embeddings_input_dim}"
                              f": not the {pooled}-wide pooled text plus {wanted} time ids of "
                              f"{unet.addition_time_embed_dim}")  # fmt: skip


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """One .safetensors file, written beside its name and moved into place: never half-written, never
    replacing a file."""
    if path.exists():
        raise OutputExists(f"{path} already exists; choose a new name")
    with writing(path) as partial:  # which also gives it the user's permissions (safetensors makes 0600)
        save_file({key: value.contiguous() for key, value in tensors.items()}, partial, metadata=metadata)


def read_json(path: Path) -> Any:
    """A model folder's JSON file, or one line saying it is missing or malformed."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: missing") from None
    except (ValueError, OSError) as error:
        raise ModelLoadError(f"{path}: not readable JSON ({type(error).__name__}: {error})") from None


def read_preset(preset: str | Path) -> dict[str, Any]:
    """A preset's sections: a name in ldm/presets/ or a YAML path."""
    path = Path(preset)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ModelLoadError(f"no preset {str(preset)!r}: use one of {names} or a .yaml path")
    return yaml.safe_load(path.read_text())


def _text_part(spec: dict[str, Any], suffix: str, encoder_class: type) -> tuple[CLIPTokenizer, CLIPTextModel]:
    """A tokenizer and its text encoder, random, from their preset sections (`suffix`: SDXL's "_2")."""
    config = CLIPTextConfig(
        **_checked(f"text_encoder{suffix}", spec[f"text_encoder{suffix}"], CLIPTextConfig().to_dict())
    )
    fields = _checked(f"tokenizer{suffix}", spec.get(f"tokenizer{suffix}", {}), {"pad_token", "model_max_length"})
    tokenizer = clip_tokenizer(**fields)
    if tokenizer.model_max_length > config.max_position_embeddings:
        raise ConfigError(
            f"tokenizer{suffix} config: model_max_length={tokenizer.model_max_length} exceeds the text encoder's "
            f"max_position_embeddings={config.max_position_embeddings}"
        )
    return tokenizer, encoder_class(config)


def _checked(part: str, config: dict[str, Any], valid: Any) -> dict[str, Any]:
    """A preset section, after refusing any field the part's class does not know."""
    unknown = sorted(set(config) - set(valid))
    if unknown:
        raise ConfigError(f"{part} config: unknown field(s) {unknown}")
    return config


def _scheduler_from_config(config: dict[str, Any]) -> SchedulerMixin:
    name = config.get("_class_name")
    scheduler_class = getattr(diffusers, str(name), None)
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, SchedulerMixin)):
        raise ConfigError(f"scheduler config: _class_name={name!r} is not a diffusers scheduler")
    with torch.device("cpu"):  # its tables, even while the parts are built on another default device
        return scheduler_class.from_config(config)


def _load_unet(folder: Path, dtype: torch.dtype) -> UNet:
    with init_empty_weights():  # no random weights first: the file's take their place (load_exactly)
        unet = UNet(UNetConfig.from_diffusers(read_json(folder / "config.json")))
    try:
        if (folder / WEIGHTS_FILE).is_file():
            state = read_weights(folder / WEIGHTS_FILE, dtype)
        elif (folder / "diffusion_pytorch_model.bin").is_file():
            state = torch.load(folder / "diffusion_pytorch_model.bin", map_location="cpu", weights_only=True)
        else:
            raise ModelLoadError(f"unet: no {WEIGHTS_FILE} (or .bin) in {folder}")
    except (SafetensorError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError) as error:
        raise ModelLoadError(f"unet: unreadable weights, truncated or damaged ({str(error).splitlines()[0]})") from None
    load_exactly(unet, state, "unet")
    return unet.to(dtype)  # fp16 files too: in the precision asked for (fp32 unless a pipeline asks)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}  # fmt: skip


def read_weights(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A .safetensors file's tensors, each read on its own and its floats cast to `dtype` at once. So
    a file in another precision never sits whole in memory beside the cast copy, as it does when
    safetensors maps the whole file and the cast reads it all (the layout: an 8-byte little-endian
    header length, a JSON header of dtype, shape and byte offsets, then the data;
    huggingface/safetensors docs, "Format")."""
    if dtype == torch.float32:
        return load_file(path)  # mapped, read as used: nothing to cast
    with path.open("rb") as file:
        header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
        start = file.tell()
        tensors = {}
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            file.seek(start + begin)
            data = bytearray(end - begin)
            if file.readinto(data) != len(data):
                raise SafetensorError(f"{path}: truncated at {key}")
            kind = SAFETENSORS_DTYPES[entry["dtype"]]
            tensor = (
                torch.frombuffer(data, dtype=kind).reshape(entry["shape"])
                if data
                else torch.empty(entry["shape"], dtype=kind)
            )
            tensors[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return tensors


def load_exactly(module: nn.Module, state: dict[str, torch.Tensor], part: str) -> None:
    """load_state_dict(strict=True), with a one-line error that names the first offending key. A module
    built on the meta device takes the tensors themselves (in their precision); others copy them."""
    expected = module.state_dict()
    mismatched = [(k, state[k].shape, v.shape) for k, v in expected.items() if k in state and state[k].shape != v.shape]
    refuse_misfits(part, set(expected) - set(state), set(state) - set(expected), mismatched)
    module.load_state_dict(state, strict=True, assign=any(w.is_meta for w in module.parameters()))


def refuse_misfits(part: str, missing: Any, unexpected: Any, mismatched: Any) -> None:
    """Raise on weights that do not fit the part's config; mismatched holds (key, found, needed) shapes."""
    if missing:
        raise ModelLoadError(f"{part}: weights lack {len(missing)} key(s) the config needs, e.g. {min(missing)}")
    if unexpected:
        raise ModelLoadError(
            f"{part}: weights have {len(unexpected)} key(s) the config does not build, e.g. {min(unexpected)}"
        )
    if mismatched:
        key, found, needed = min(mismatched)
        raise ModelLoadError(f"{part}: {key} has shape {tuple(found)} but the config needs {tuple(needed)}")


def _load_pretrained(model_class: Any, folder: Path, dtype: torch.dtype, **options: Any) -> nn.Module:
    """transformers/diffusers from_pretrained, refusing what they would re-initialise: missing or misshapen weights."""
    try:
        model, info = model_class.from_pretrained(
            folder, output_loading_info=True, ignore_mismatched_sizes=True, torch_dtype=dtype, **options
        )
    except OSError as error:  # no config or no weights file
        raise ModelLoadError(f"{folder.name}: {str(error).strip().splitlines()[0]}") from None
    except (SafetensorError, RuntimeError, pickle.UnpicklingError, EOFError) as error:  # a damaged file
        raise ModelLoadError(
            f"{folder.name}: unreadable weights, truncated or damaged ({str(error).strip().splitlines()[0]})"
        ) from None
    refuse_misfits(folder.name, info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"])
    return model.to(dtype)  # fp16 files too: in the precision asked for (fp32 unless a pipeline asks)
