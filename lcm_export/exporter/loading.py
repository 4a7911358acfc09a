"""Load a diffusers pipeline from a folder (or a hub id) and classify it.

What the exporter needs to know about a pipeline is gathered once into :class:`LoadedPipeline`: the torch
modules, the guidance mode (LCM's w-embedding or classifier-free guidance), the VAE's scale factor and scaling
factor read from the model, never assumed.

The pipeline is loaded with its torch modules as weightless skeletons (on PyTorch's ``meta`` device: configs,
tokenizers and scheduler are real); :meth:`LoadedPipeline.module` loads one module's weights when a component
needs them and :meth:`LoadedPipeline.release` frees them again, so an export holds one component's weights at a
time (an SDXL U-Net alone is 10.3 GB in fp32, the whole pipeline 14 GB).

``--vae PATH`` swaps the VAE's skeleton for one built from another AutoencoderKL folder (:func:`attach_vae`):
the same lazy load then reads that folder's weights, and the pipeline's own VAE weights are never read.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lcm_export.errors import ExportError
from lcm_export.runtime.conditioning import SDXL_SIZE_IDS
from lcm_export.runtime.manifest import FAMILY_TEXT_ENCODERS

BUILTIN_MODELS = {
    "builtin:tiny-lcm": "lcm",
    "builtin:tiny-sd": "sd",
    "builtin:tiny-sdxl-lcm": "sdxl-lcm",
    "builtin:tiny-sdxl": "sdxl",
}


@dataclass(frozen=True)
class ReplacedModule:
    """A pipeline module whose weights come from another folder than the pipeline's (``--vae``)."""

    option: str  # how the user named it, for messages: "--vae 'PATH'"
    folder: Path  # the module's own folder (config.json and weights)
    entry: tuple[str, str]  # (library, class name), as a model_index.json entry


@dataclass
class LoadedPipeline:
    """A loaded pipeline and the facts about it the export needs."""

    source: str  # what the user passed
    path: Path  # the folder it was loaded from
    pipeline: Any  # diffusers pipeline; its torch modules are skeletons until module() loads them (fp32, eval)
    family: str  # "sd" (SD 1.x/2.x); "sdxl" (SDXL, SSD-1B: text_encoder_2, U-Net text_embeds and time_ids)
    guidance: str  # "embedding" (distilled LCM, timestep_cond) or "cfg" (base SD + LCM-LoRA)
    vae_scale_factor: int
    vae_scaling_factor: float
    vae_shift_factor: float | None
    spatial_multiple: int  # height/width must be a multiple of this (VAE x U-Net down-sampling)
    tiny_vae: Any = None  # diffusers AutoencoderTiny (--tiny-vae) replacing the VAE in the bundle, or None
    replaced: dict[str, ReplacedModule] = field(default_factory=dict)  # modules loaded from elsewhere (--vae)
    released: set[str] = field(default_factory=set)  # modules whose weights release() freed
    controlnets: tuple[Any, ...] = ()  # --controlnet: exporter.controlnet.LoadedControlNet, in order

    @property
    def unet(self) -> Any:
        """The U-Net as the pipeline holds it now: its config always, its weights once ``module("unet")`` ran."""
        return self.pipeline.unet

    def module(self, name: str) -> Any:
        """The pipeline's torch module ``name`` with its weights, loaded now if it is still a skeleton.

        Loaded as diffusers loads it in the pipeline (``from_pretrained`` of its folder, fp32, eval mode, no
        gradients) and put in the pipeline's place; a module :attr:`replaced` (``--vae``) from its own folder. A
        released module is not loaded again: what was in memory (fused LoRAs, attention processors) would silently
        be lost, so asking for it is a bug.
        """
        if name in self.released:
            raise RuntimeError(f"the {name} was released after its export; it cannot be used again")
        module = getattr(self.pipeline, name)
        if not is_skeleton(module):
            return module
        replacement = self.replaced.get(name)
        if replacement is not None:
            folder, entry, label = replacement.folder, replacement.entry, replacement.option
        else:
            folder, entry, label = self.path / name, self.pipeline.config[name], f"MODEL '{self.source}': its {name}"
        try:
            module = load_module(folder, entry)
        except (OSError, ValueError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ExportError(f"{label} could not be loaded: {reason}") from None
        setattr(self.pipeline, name, module)
        return module

    def release(self, name: str) -> None:
        """Free the weights of the torch module ``name`` (moved to ``meta`` in place, so no wrapper around it
        keeps them alive); its config stays readable."""
        module = getattr(self.pipeline, name)
        self.released.add(name)
        if not is_skeleton(module):
            module.to("meta")

    @property
    def text_encoders(self) -> tuple[tuple[str, str], ...]:
        """(text encoder, tokenizer) names of the family, in the order their hidden states are concatenated."""
        return FAMILY_TEXT_ENCODERS[self.family]

    @property
    def vae_kind(self) -> str:
        """Which VAE the bundle carries: "autoencoder_kl" (the pipeline's) or "autoencoder_tiny" (TAESD)."""
        return "autoencoder_kl" if self.tiny_vae is None else "autoencoder_tiny"

    @property
    def bundle_vae(self) -> Any:
        """The VAE whose decoder (and encoder) the bundle carries."""
        return self.pipeline.vae if self.tiny_vae is None else self.tiny_vae


def resolve_model_path(model: str, workdir: Path | None = None) -> Path:
    """A local folder for ``model``: itself, a built-in tiny model, or a hub download (where a network exists).

    A built-in model is built into ``workdir`` (the caller's scratch folder, removed by the caller); without one,
    into a new temporary folder that the caller owns.
    """
    if model in BUILTIN_MODELS:
        from lcm_export.exporter.tiny import TinyPipelineConfig, build_tiny_pipeline

        folder = workdir / "builtin-model" if workdir is not None else Path(tempfile.mkdtemp(prefix="lcm-export-"))
        return build_tiny_pipeline(folder, TinyPipelineConfig(kind=BUILTIN_MODELS[model]))
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ExportError(f"MODEL '{model}' is a file: pass a diffusers pipeline folder (with model_index.json)")
        if not (path / "model_index.json").is_file():
            raise ExportError(
                f"MODEL '{model}' is not a diffusers pipeline folder (no model_index.json): "
                "pass a folder written by save_pretrained, or a hub id"
            )
        return path
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ExportError(f"MODEL '{model}' does not exist: pass a diffusers pipeline folder or a hub id (owner/name)")
    return snapshot_from_hub(f"MODEL '{model}'", model, ["*.json", "*.txt", "*.safetensors"])


def snapshot_from_hub(label: str, repo_id: str, patterns: list[str]) -> Path:
    """Download a hub repo's files matching ``patterns`` (where a network exists); any failure is one line."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as error:  # network, auth or missing repo: all user-facing
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ExportError(
            f"{label} is not a local folder and could not be downloaded from the hub ({reason}): "
            "download it where a network exists and pass the folder"
        ) from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ExportError(f"cannot read '{path}': {error}") from None


def model_family(index: dict[str, Any]) -> str:
    """ "sdxl" for a pipeline with a second text encoder (SDXL, SSD-1B, their LCMs), else "sd"."""
    return "sdxl" if "text_encoder_2" in index else "sd"


def sdxl_micro_conditioning_ids(path: Path) -> int | None:
    """How many size (and score) ids an SDXL U-Net's added embedding takes, from its config and the second text
    encoder's projection width; None when the configs do not say."""
    unet = _read_json(path / "unet" / "config.json")
    encoder_config = path / "text_encoder_2" / "config.json"
    projection = _read_json(encoder_config).get("projection_dim") if encoder_config.is_file() else None
    total, per_id = unet.get("projection_class_embeddings_input_dim"), unet.get("addition_time_embed_dim")
    if not all(isinstance(value, int) and value > 0 for value in (total, per_id, projection)):
        return None
    return (total - projection) // per_id if (total - projection) % per_id == 0 else None


def check_sdxl_size_ids(model: str, path: Path, index: dict[str, Any]) -> None:
    """Refuse an SDXL whose U-Net needs aesthetic scores (the refiner): the runtime builds base SDXL's six ids.

    diffusers' SDXL img2img pipeline passes [original size, crop, aesthetic score] when ``requires_aesthetics_score``
    is set (the refiner, 5 ids) and [original size, crop, target size] otherwise; text-to-image always the latter.
    """
    ids = sdxl_micro_conditioning_ids(path)
    if index.get("requires_aesthetics_score") or (ids is not None and ids != SDXL_SIZE_IDS):
        takes = (
            f"its U-Net takes {ids} micro-conditioning ids"
            if ids is not None and ids != SDXL_SIZE_IDS
            else "it sets requires_aesthetics_score"
        )
        raise ExportError(
            f"MODEL '{model}' needs aesthetic scores ({takes}: an SDXL refiner's original size, crop and aesthetic "
            f"score): only base SDXL/SSD-1B U-Nets ({SDXL_SIZE_IDS} ids: original size, crop, target size) are "
            "supported; export the base model"
        )


def inspect_model_folder(model: str, path: Path, has_loras: bool) -> str:
    """Check a pipeline folder before loading weights, so a wrong model fails in a second, not a minute; returns
    the model family."""
    index = _read_json(path / "model_index.json")
    family = model_family(index)
    if "unet" not in index or not (path / "unet" / "config.json").is_file():
        raise ExportError(f"MODEL '{model}' has no U-Net (unet/config.json): only U-Net LCM pipelines are supported")
    if family == "sdxl":
        check_sdxl_size_ids(model, path, index)
    text_parts = [part for pair in FAMILY_TEXT_ENCODERS[family] for part in pair]
    for part in (*text_parts, "vae", "scheduler"):
        if part not in index or not (path / part).is_dir():
            raise ExportError(f"MODEL '{model}' has no '{part}' folder: it is not a complete text-to-image pipeline")
    unet_config = _read_json(path / "unet" / "config.json")
    if unet_config.get("_class_name") != "UNet2DConditionModel":
        raise ExportError(
            f"MODEL '{model}': U-Net class {unet_config.get('_class_name')!r} is not supported "
            "(expected UNet2DConditionModel)"
        )
    if unet_config.get("time_cond_proj_dim") is None and not has_loras:
        raise ExportError(
            f"MODEL '{model}' is not an LCM (its U-Net has no time_cond_proj_dim): pass an LCM pipeline, "
            "or a base Stable Diffusion pipeline with --lora pointing at an LCM-LoRA"
        )
    if family == "sdxl" and unet_config.get("addition_embed_type") != "text_time":
        raise ExportError(
            f"MODEL '{model}': its U-Net's addition_embed_type is {unet_config.get('addition_embed_type')!r}: "
            "an SDXL-shaped pipeline's U-Net takes pooled text and size ids ('text_time')"
        )
    return family


def load_pipeline(model: str, *, has_loras: bool = False, workdir: Path | None = None) -> LoadedPipeline:
    """Load ``model`` in fp32 on the CPU and classify it (``workdir``: scratch space for built-in models)."""
    path = resolve_model_path(model, workdir)
    family = inspect_model_folder(model, path, has_loras)

    import torch
    from diffusers import DiffusionPipeline

    # SD pipelines take (and drop) a safety checker; SDXL's have none and would warn about the arguments.
    no_safety_checker = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    index = _read_json(path / "model_index.json")
    encoders = [encoder for encoder, _ in FAMILY_TEXT_ENCODERS[family]]
    try:
        # The torch modules as skeletons: no weights are read until a component needs them (module()).
        skeletons = {name: module_skeleton(path / name, index[name]) for name in ("unet", "vae", *encoders)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # diffusers renames torch_dtype; older ones need it
            pipeline = DiffusionPipeline.from_pretrained(
                str(path), torch_dtype=torch.float32, **skeletons, **no_safety_checker
            )
    except (OSError, ValueError, TypeError, AttributeError, ImportError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ExportError(f"MODEL '{model}' could not be loaded by diffusers: {reason}") from None

    unet_config = pipeline.unet.config
    vae_config = pipeline.vae.config
    refuse_latent_statistics(vae_config, f"MODEL '{model}'")
    vae_scale_factor = 2 ** (len(vae_config.block_out_channels) - 1)
    unet_down_factor = 2 ** (len(unet_config.down_block_types) - 1)
    return LoadedPipeline(
        source=model,
        path=path,
        pipeline=pipeline,
        family=family,
        guidance="embedding" if unet_config.time_cond_proj_dim is not None else "cfg",
        vae_scale_factor=vae_scale_factor,
        **latent_factors(vae_config),
        spatial_multiple=vae_scale_factor * unet_down_factor,
    )


def latent_factors(config: Any) -> dict[str, float | None]:
    """The latent scaling (and shift) factors a VAE config gives, as ``LoadedPipeline`` fields: diffusers'
    pipelines scale latents by the ``vae.config`` of the VAE they run (the pipeline's, ``--vae``'s, the tiny one's)."""
    shift = getattr(config, "shift_factor", None)
    return {
        "vae_scaling_factor": float(config.scaling_factor),
        "vae_shift_factor": float(shift) if shift is not None else None,
    }


def check_latents_fit(loaded: LoadedPipeline, option: str, channels: int, factors: tuple[int, ...], what: str) -> None:
    """A replacement VAE (``option``, e.g. ``--vae 'PATH'``) must read and write the U-Net's latents: the same
    latent channels, and each of ``factors`` (its decoder's, and its encoder's where it has one in the bundle) the
    pipeline VAE's scale factor."""
    expected_channels = int(loaded.unet.config.in_channels)
    if channels != expected_channels:
        raise ExportError(
            f"{option} has {channels} latent channels but the U-Net of '{loaded.source}' has {expected_channels}: "
            f"pass {what} made for this model family"
        )
    for factor in factors:
        if factor != loaded.vae_scale_factor:
            raise ExportError(
                f"{option} scales latents by {factor} but the VAE of '{loaded.source}' by "
                f"{loaded.vae_scale_factor}: pass {what} made for this model family"
            )


def refuse_latent_statistics(config: Any, label: str) -> None:
    """A VAE whose config sets ``latents_mean`` and ``latents_std`` (Playground v2.5's SDXL VAE) has its latents
    normalised per channel by diffusers' SDXL pipelines; the bundle's runtime scales them by one factor. Refused at
    export rather than decoded wrong without a word."""
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        raise ExportError(
            f"{label}: its VAE config sets latents_mean and latents_std (per-channel latent statistics), which "
            "lcm-export does not support: pass a VAE that uses one scaling_factor (--vae PATH)"
        )


def is_skeleton(module: Any) -> bool:
    """Whether ``module`` has no weights in memory (its parameters are on PyTorch's ``meta`` device)."""
    return any(parameter.is_meta for parameter in module.parameters())


def _module_class(entry: Any) -> Any:
    """The class a ``model_index.json`` entry ``[library, class name]`` names (diffusers or transformers)."""
    import importlib

    if not (isinstance(entry, list | tuple) and len(entry) == 2 and entry[0] in ("diffusers", "transformers")):
        raise ValueError(f"model_index.json entry {entry!r} is not a diffusers or transformers class")
    return getattr(importlib.import_module(entry[0]), entry[1])


def module_skeleton(folder: Path, entry: Any) -> Any:
    """The module saved in ``folder`` (of class ``entry``) built from its config on the ``meta`` device: every
    attribute and config of the real one, no weights (built in a second, whatever the model's size)."""
    import torch

    module_class = _module_class(entry)
    with torch.device("meta"):
        if entry[0] == "diffusers":
            module = module_class.from_config(module_class.load_config(str(folder)))
        else:
            module = module_class(module_class.config_class.from_pretrained(str(folder)))
    return module.eval().requires_grad_(False)


def load_module(folder: Path, entry: Any) -> Any:
    """The module saved in ``folder`` (of class ``entry``) with its weights, in fp32, eval mode, without gradients.

    Weights stored in another dtype (an fp16 checkpoint) are upcast one tensor at a time by the library's loader.
    The library reads the checkpoint through a private memory map (torch's, for safetensors) and keeps it until the
    whole module is loaded; its pages are reclaimed while it loads
    (:func:`~lcm_export.runtime.backends.mapped_files.released_while`), so they do not stay resident beside the fp32
    weights made from them (the SDXL-shaped U-Net: a 5 GB fp16 file beside 10.3 GB of fp32 weights).
    """
    import torch

    from lcm_export.runtime.backends.mapped_files import released_while

    module_class = _module_class(entry)
    dtype = {"torch_dtype" if entry[0] == "diffusers" else "dtype": torch.float32}
    with warnings.catch_warnings(), released_while(checkpoint_folders(folder), private=True):
        warnings.simplefilter("ignore", FutureWarning)
        module = module_class.from_pretrained(str(folder), **dtype)
    return module.eval().requires_grad_(False)


def checkpoint_folders(folder: Path) -> list[Path]:
    """The folders whose files a module saved in ``folder`` is read from, as the process maps them: the folder
    itself and, for files that are links (the Hugging Face cache links each file to a blob), their targets'."""
    folders = [folder.resolve()]
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.is_symlink() and path.resolve().parent not in folders:
            folders.append(path.resolve().parent)
    return folders


@dataclass(frozen=True)
class AutoencoderOption:
    """An option that names a VAE folder to use instead of the pipeline's (``--vae``, ``--tiny-vae``): what it
    takes and what its messages say."""

    flag: str  # "--vae"
    class_name: str  # the diffusers class its config.json must name
    expected: str  # what to pass, after "does not exist: pass "
    instead: str  # what to pass, after "is not a <class> folder (...): "
    hub_patterns: tuple[str, ...]  # the files of a hub repo to download


TINY_VAE_OPTION = AutoencoderOption(
    flag="--tiny-vae",
    class_name="AutoencoderTiny",
    expected="an AutoencoderTiny (TAESD) folder written by save_pretrained, or a hub id such as madebyollin/taesd",
    instead="pass a TAESD folder written by AutoencoderTiny.save_pretrained",
    hub_patterns=("*.json", "*.safetensors"),
)
VAE_OPTION = AutoencoderOption(
    flag="--vae",
    class_name="AutoencoderKL",
    expected="an AutoencoderKL folder written by save_pretrained (or a pipeline folder with vae/), or a hub id "
    "such as madebyollin/sdxl-vae-fp16-fix",
    instead="pass a folder written by AutoencoderKL.save_pretrained, or a pipeline folder with vae/ "
    "(a TAESD goes to --tiny-vae)",
    # The VAE's own files, at the top (a VAE repo) or in vae/ (a pipeline repo): never a whole pipeline's weights.
    hub_patterns=("config.json", "diffusion_pytorch_model*", "vae/config.json", "vae/diffusion_pytorch_model*"),
)


def _config_class(config_path: Path) -> str | None:
    """The ``_class_name`` a diffusers ``config.json`` names, or None (no file, not an object, no name)."""
    if not config_path.is_file():
        return None
    config = _read_json(config_path)
    name = config.get("_class_name") if isinstance(config, dict) else None
    return name if isinstance(name, str) else None


def resolve_autoencoder_path(option: AutoencoderOption, source: str) -> Path:
    """The folder of the VAE that ``option`` names: ``source`` itself, its ``vae/`` subfolder, or a hub download.

    Only ``config.json`` is read here (no weights), so a wrong path fails before the pipeline is loaded.
    """
    label = f"{option.flag} '{source}'"
    path = Path(source).expanduser()
    if not path.exists():
        looks_like_hub_id = source.count("/") == 1 and not source.startswith((".", "/", "~"))
        if not looks_like_hub_id:
            raise ExportError(f"{label} does not exist: pass {option.expected}")
        path = snapshot_from_hub(label, source, list(option.hub_patterns))
    if not path.is_dir():
        raise ExportError(f"{label} is a file: pass the {option.class_name} folder (with config.json)")
    for candidate in (path, path / "vae"):
        if _config_class(candidate / "config.json") == option.class_name:
            return candidate
    found = _config_class(path / "config.json")
    what = f"its config.json describes {found!r}" if found else "it has no config.json"
    raise ExportError(f"{label} is not an {option.class_name} folder ({what}): {option.instead}")


def resolve_tiny_vae_path(source: str) -> Path:
    """The folder of the ``--tiny-vae`` AutoencoderTiny (see :func:`resolve_autoencoder_path`)."""
    return resolve_autoencoder_path(TINY_VAE_OPTION, source)


def resolve_vae_path(source: str) -> Path:
    """The folder of the ``--vae`` AutoencoderKL (see :func:`resolve_autoencoder_path`)."""
    return resolve_autoencoder_path(VAE_OPTION, source)


def check_vae_options(vae: str | None, tiny_vae: str | None) -> None:
    """``--vae`` and ``--tiny-vae`` both replace the pipeline's VAE decoder: one of them, before any model loads."""
    if vae is not None and tiny_vae is not None:
        raise ExportError(
            f"--vae '{vae}' and --tiny-vae '{tiny_vae}' both replace the VAE decoder: pass one of them (--tiny-vae "
            "for the fastest decoder, --vae for a full AutoencoderKL such as an fp16-fixed one)"
        )
    if tiny_vae is not None:
        resolve_tiny_vae_path(tiny_vae)
    if vae is not None:
        resolve_vae_path(vae)


def tiny_vae_scale_factors(config: dict[str, Any]) -> tuple[int, int]:
    """(decoder up-sampling, encoder down-sampling) of an AutoencoderTiny config, counted as diffusers builds it.

    DecoderTiny up-samples by ``upsampling_scaling_factor`` between consecutive decoder blocks; EncoderTiny
    down-samples by 2 (stride-2 convolution) at the start of every block but the first.
    """
    decoder_blocks = len(config.get("num_decoder_blocks") or config.get("decoder_block_out_channels") or (3, 3, 3, 1))
    encoder_blocks = len(config.get("num_encoder_blocks") or config.get("encoder_block_out_channels") or (1, 3, 3, 3))
    upsampling = int(config.get("upsampling_scaling_factor", 2))
    return upsampling ** (decoder_blocks - 1), 2 ** (encoder_blocks - 1)


def attach_tiny_vae(loaded: LoadedPipeline, source: str, *, with_encoder: bool) -> LoadedPipeline:
    """``loaded`` with the AutoencoderTiny at ``source`` as its bundle VAE.

    The tiny VAE must decode the U-Net's latents: same latent channels and the same scale factor as the
    pipeline's VAE (its encoder's too when ``with_encoder``). The latent scaling (and shift) factors then come
    from the tiny VAE's config, exactly as diffusers' pipelines use ``vae.config.scaling_factor`` when they are
    given ``vae=AutoencoderTiny`` (1.0 for TAESD, whose decoder takes the U-Net's latents as they are).
    """
    import dataclasses

    path = resolve_tiny_vae_path(source)
    config = _read_json(path / "config.json")
    decoder_factor, encoder_factor = tiny_vae_scale_factors(config)
    factors = (decoder_factor, encoder_factor) if with_encoder else (decoder_factor,)
    check_latents_fit(loaded, f"--tiny-vae '{source}'", int(config.get("latent_channels", 4)), factors, "a tiny VAE")

    import torch
    from diffusers import AutoencoderTiny

    try:
        tiny = AutoencoderTiny.from_pretrained(str(path), torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ExportError(f"--tiny-vae '{source}' could not be loaded by diffusers: {reason}") from None
    tiny.eval().requires_grad_(False)
    return dataclasses.replace(loaded, tiny_vae=tiny, **latent_factors(tiny.config))


def attach_vae(loaded: LoadedPipeline, source: str) -> LoadedPipeline:
    """``loaded`` with the AutoencoderKL at ``source`` (``--vae``) in place of the pipeline's VAE.

    Only its config is read here: the pipeline's VAE skeleton is swapped for one built from ``source``, and
    :meth:`LoadedPipeline.module` loads its weights from there when the VAE decoder (or encoder) is built, as it
    would the pipeline's own. It must decode the U-Net's latents: same latent channels and the same scale factor
    (2 ** (len(block_out_channels) - 1)) as the pipeline's VAE. The latent scaling (and shift) factors then come
    from its config, as diffusers' pipelines use ``vae.config.scaling_factor`` when given ``vae=``.
    """
    import dataclasses

    path = resolve_vae_path(source)
    option = f"--vae '{source}'"
    entry = ("diffusers", VAE_OPTION.class_name)
    try:
        skeleton = module_skeleton(path, entry)
    except (OSError, ValueError, TypeError, KeyError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ExportError(f"{option} could not be read by diffusers: {reason}") from None
    config = skeleton.config
    refuse_latent_statistics(config, option)
    factor = 2 ** (len(config.block_out_channels) - 1)
    check_latents_fit(loaded, option, int(config.latent_channels), (factor,), "a VAE")
    loaded.pipeline.vae = skeleton  # its config is the bundle VAE's; module("vae") loads its weights from path
    return dataclasses.replace(
        loaded, replaced={**loaded.replaced, "vae": ReplacedModule(option, path, entry)}, **latent_factors(config)
    )
