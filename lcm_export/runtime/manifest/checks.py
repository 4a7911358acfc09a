"""The manifest's cross-checks: what one part must agree on with the others.

The conditioning against the pipeline and the tokenizers; each component's variants against the target, the
files the manifest hashes and the component's folder; each component's I/O against what the runtime feeds and
reads; and each engine's or package's details against the spec and the pipeline. Each raises one
:class:`ManifestFieldError` naming the field.
"""

from __future__ import annotations

import json

from lcm_export.runtime.manifest.control import CONTROLNET_COMPONENT, ControlNetInfo, check_controlnet
from lcm_export.runtime.manifest.details import CoreMLPackageDetails, TensorRTEngineDetails
from lcm_export.runtime.manifest.model import Component, Conditioning, PipelineInfo, TokenizerInfo
from lcm_export.runtime.manifest.vocabulary import (
    COMPONENT_NAMES,
    FAMILY_TEXT_ENCODERS,
    FLOAT_DTYPES,
    FOLDER_FORMATS,
    RUNTIME_COMPONENTS,
    TARGET_FORMATS,
)
from lcm_export.runtime.specs import (
    ComponentSpec,
    Fields,
    ManifestFieldError,
    TensorSpec,
    describe,
    field_path,
)


def unlisted(path: str) -> str:
    """The problem of a path the manifest uses but does not hash."""
    return (
        f"names {describe(path)}, which manifest.json files does not list (it would be used without its sha256 check)"
    )


def read_components(
    top: Fields,
    pipeline: PipelineInfo,
    conditioning: Conditioning,
    target: str,
    listed: set[str],
    control: ControlNetInfo | None = None,
) -> dict[str, Component]:
    entries = top.object("components")
    if not entries.data:
        raise ManifestFieldError(entries.where, "must hold at least one component")
    components: dict[str, Component] = {}
    for name, entry in entries.data.items():
        where = entries.path(name)
        if name not in COMPONENT_NAMES and not CONTROLNET_COMPONENT.fullmatch(name):
            known = ", ".join((*COMPONENT_NAMES, "controlnet", "controlnet_N"))
            raise ManifestFieldError(where, f"is not a component this runtime knows ({known})")
        declared = [encoder.component for encoder in conditioning.text_encoders]
        if name.startswith("text_encoder") and name not in declared:
            raise ManifestFieldError(
                where, f"is a text encoder the conditioning does not declare ({', '.join(declared)})"
            )
        component = Component.from_json(name, entry, where)
        _check_variants(component, where, pipeline, target, listed)
        _check_io(component, where, pipeline, conditioning, control)
        components[name] = component
    for name in RUNTIME_COMPONENTS:
        # A bundle exported without a component has no files in its folder; one whose entry was lost has.
        orphans = sorted(path for path in listed if path.startswith(f"{name}/"))
        if name not in components and orphans:
            raise ManifestFieldError(
                entries.path(name), f"is missing although files lists {describe(orphans[0])} of it"
            )
    control_at = top.path("controlnet")
    if control is not None:
        check_controlnet(control, {name: component.spec for name, component in components.items()}, control_at)
    elif any(CONTROLNET_COMPONENT.fullmatch(name) for name in components):
        raise ManifestFieldError(control_at, "is missing, but the bundle has a ControlNet component")
    unet = components.get("unet")
    encoders = [components.get(encoder.component) for encoder in conditioning.text_encoders]
    if unet is not None and all(encoder is not None for encoder in encoders):
        # The hidden states of every encoder, concatenated on the last axis, are what the U-Net attends to.
        hidden = sum(
            _tensor(component.spec, encoder.hidden_state).shape[2]
            for component, encoder in zip(encoders, conditioning.text_encoders, strict=True)
        )
        for input_name, source in conditioning.unet_inputs.items():
            context = _tensor(unet.spec, input_name)
            if source == "text_hidden_states" and context.shape[2] != hidden:
                index = unet.spec.inputs.index(context)
                raise ManifestFieldError(
                    f"{entries.path('unet')}.inputs[{index}].shape[2]",
                    f"must be the text encoders' hidden size, {hidden} (got {context.shape[2]})",
                )
    return components


def check_conditioning(
    conditioning: Conditioning, pipeline: PipelineInfo, tokenizers: tuple[TokenizerInfo, ...], where: str
) -> None:
    """The declaration names known components and tokenizers, and its sources fit the pipeline."""
    tokenizer_names = {tokenizer.name for tokenizer in tokenizers}
    seen: set[str] = set()
    for index, encoder in enumerate(conditioning.text_encoders):
        at = f"{where}.text_encoders[{index}]"
        if not encoder.component.startswith("text_encoder") or encoder.component not in COMPONENT_NAMES:
            raise ManifestFieldError(
                f"{at}.component", f"is not a text encoder component (got {describe(encoder.component)})"
            )
        if encoder.component in seen:
            raise ManifestFieldError(f"{at}.component", f"repeats {describe(encoder.component)}")
        seen.add(encoder.component)
        if encoder.tokenizer not in tokenizer_names:
            raise ManifestFieldError(
                f"{at}.tokenizer", f"names no tokenizer of this bundle ({', '.join(sorted(tokenizer_names))})"
            )
    declared = tuple((encoder.component, encoder.tokenizer) for encoder in conditioning.text_encoders)
    if declared != FAMILY_TEXT_ENCODERS[pipeline.family]:
        expected = ", ".join(
            f"{component} ({tokenizer})" for component, tokenizer in FAMILY_TEXT_ENCODERS[pipeline.family]
        )
        raise ManifestFieldError(
            "pipeline.family",
            f"is {describe(pipeline.family)}, whose text encoders are {expected}; the conditioning declares "
            + ", ".join(f"{component} ({tokenizer})" for component, tokenizer in declared),
        )
    sources = set(conditioning.unet_inputs.values())
    inputs_at = f"{where}.unet_inputs"
    for name in conditioning.unet_inputs:
        if name in ("sample", "timestep"):
            raise ManifestFieldError(f"{inputs_at}.{name}", "is fed by the loop itself, not by the conditioning")
    if "text_hidden_states" not in sources:
        raise ManifestFieldError(
            inputs_at, "must feed the text encoders' hidden states (text_hidden_states) to an input"
        )
    if ("guidance_embedding" in sources) != (pipeline.time_cond_proj_dim is not None):
        raise ManifestFieldError(
            inputs_at, "must feed guidance_embedding exactly when pipeline.time_cond_proj_dim is set (distilled LCM)"
        )
    frequencies = conditioning.guidance_frequencies
    if frequencies is not None:
        half = (pipeline.time_cond_proj_dim or 0) // 2
        if len(frequencies) != half:
            raise ManifestFieldError(
                f"{where}.guidance_frequencies",
                f"must hold time_cond_proj_dim // 2 = {half} frequencies (got {len(frequencies)})",
            )
    if "pooled_text" in sources and not any(encoder.pooled for encoder in conditioning.text_encoders):
        raise ManifestFieldError(inputs_at, "feeds pooled_text, but no text encoder declares a pooled output")


def _check_variants(component: Component, where: str, pipeline: PipelineInfo, target: str, listed: set[str]) -> None:
    """A variant of the target's format is there (ONNX variants may sit beside it); each variant is inside the
    component's folder and made of files the manifest hashes; the spec's float tensors are float32 (each
    variant's own float dtype is its ``io_dtype``)."""
    name, spec = component.spec.name, component.spec
    runs = TARGET_FORMATS[target]
    if runs not in {variant.format for variant in component.variants}:
        formats = ", ".join(sorted({variant.format for variant in component.variants}))
        raise ManifestFieldError(
            f"{where}.variants", f"has no {runs} variant, which a {target} bundle runs (it has {formats})"
        )
    for index, variant in enumerate(component.variants):
        at = f"{where}.variants[{index}]"
        if variant.format not in (runs, "onnx"):
            allowed = runs if runs == "onnx" else f"{runs}, and onnx"
            raise ManifestFieldError(f"{at}.format", f"is not a format of a {target} bundle ({allowed})")
        if not variant.path.startswith(f"{name}/"):
            raise ManifestFieldError(f"{at}.path", f"must be inside the folder {name}/ (got {describe(variant.path)})")
        for file_index, path in enumerate(variant.files):
            if path not in listed:
                raise ManifestFieldError(f"{at}.files[{file_index}]", unlisted(path))
            if not (path == variant.path or path.startswith(f"{variant.path}/") or path.startswith(f"{name}/")):
                raise ManifestFieldError(f"{at}.files[{file_index}]", f"must be inside the folder {name}/")
        if variant.format in FOLDER_FORMATS:
            inside = {path for path in listed if path.startswith(f"{variant.path}/")}
            if variant.path in listed or not inside:
                raise ManifestFieldError(f"{at}.path", "names a folder none of whose files manifest.json files lists")
            missing = sorted(inside - set(variant.files))
            if missing:
                raise ManifestFieldError(
                    f"{at}.files", f"must list every file of the folder (not {describe(missing[0])})"
                )
        elif variant.path not in listed:
            raise ManifestFieldError(f"{at}.path", unlisted(variant.path))
        elif variant.path not in variant.files:
            raise ManifestFieldError(f"{at}.files", f"must include the variant's path {describe(variant.path)}")
        if variant.precision == "fp32" and variant.io_dtype != "float32":
            raise ManifestFieldError(f"{at}.io_dtype", f"must be float32 for an fp32 variant (got {variant.io_dtype})")
        if variant.format == "tensorrt":
            engine = TensorRTEngineDetails.from_json(variant.details, at)
            check_tensorrt_engine(engine, spec.with_dtypes(variant.io_dtype), pipeline, at)
        elif variant.format == "mlpackage":
            check_coreml_package(CoreMLPackageDetails.from_json(variant.details, at), spec, at)
    for kind, tensors in (("inputs", spec.inputs), ("outputs", spec.outputs)):
        for index, tensor in enumerate(tensors):
            if tensor.dtype in FLOAT_DTYPES and tensor.dtype != "float32":
                raise ManifestFieldError(
                    f"{where}.{kind}[{index}].dtype",
                    f"must be float32: the spec gives the model's float tensors as float32, each variant its own "
                    f"io_dtype (got {tensor.dtype})",
                )
    sees_cfg_batch = name == "unet" or name.startswith("text_encoder") or bool(CONTROLNET_COMPONENT.fullmatch(name))
    wanted = 2 if pipeline.guidance == "cfg" and sees_cfg_batch else 1
    if spec.batch_multiplier != wanted:
        raise ManifestFieldError(
            f"{where}.batch_multiplier",
            f"must be {wanted} for {name} with guidance {describe(pipeline.guidance)} (got {spec.batch_multiplier})",
        )


_ANY = 0  # in an expected shape: any positive integer
# The U-Net's timestep: a scalar shared by the batch (bundles exported before per-row timesteps), or one per row.
TIMESTEP_SHAPES: tuple[tuple[int | str, ...], ...] = ((), ("batch",))


def _shape_matches(shape: tuple[int | str, ...], expected: tuple[int | str, ...]) -> bool:
    return len(shape) == len(expected) and all(
        dim == want or (want == _ANY and isinstance(dim, int)) for dim, want in zip(shape, expected, strict=True)
    )


def _expected_io(
    name: str, pipeline: PipelineInfo, conditioning: Conditioning, control: ControlNetInfo | None = None
) -> tuple[dict[str, tuple | None], dict[str, tuple]]:
    """(inputs, outputs) name -> expected shape of what the runtime feeds and reads (``_ANY``: any size; None: a
    ControlNet residual, whose shape :func:`check_controlnet` checks against the ControlNets').

    The inputs are exactly these; the outputs at least these (the text encoder also gives ``pooler_output``).
    The text encoders' outputs and the U-Net's conditioning inputs follow the conditioning declaration.
    """
    channels = pipeline.latent_channels
    latent = ("batch", channels, "latent_height", "latent_width")
    image = ("batch", _ANY, "image_height", "image_width")
    encoders = [encoder for encoder in conditioning.text_encoders if encoder.component == name]
    if encoders:
        outputs = {encoders[0].hidden_state: ("batch", "sequence", _ANY)}
        if encoders[0].pooled:
            outputs[encoders[0].pooled] = ("batch", _ANY)
        return {"input_ids": ("batch", "sequence")}, outputs
    if name == "unet":
        by_source = {
            "text_hidden_states": ("batch", "sequence", _ANY),
            "pooled_text": ("batch", _ANY),
            "guidance_embedding": ("batch", pipeline.time_cond_proj_dim),
            "size_ids": ("batch", _ANY),
        }
        inputs = {"sample": latent, "timestep": TIMESTEP_SHAPES}
        inputs.update({input_name: by_source[source] for input_name, source in conditioning.unet_inputs.items()})
        inputs.update({residual: None for residual in (control.residual_inputs if control else ())})
        return inputs, {"out_sample": latent}
    if name.startswith("text_encoder"):  # a text encoder the conditioning does not use
        return {"input_ids": ("batch", "sequence")}, {}
    if name == "vae_decoder":
        return {"latent_sample": latent}, {"sample": image}
    # vae_encoder: KL's mean and log-variance (2C channels), or the tiny VAE's latents.
    if pipeline.vae == "autoencoder_kl":
        return {"sample": image}, {"latent_parameters": ("batch", 2 * channels, "latent_height", "latent_width")}
    return {"sample": image}, {"latents": latent}


def _check_io(
    component: Component,
    where: str,
    pipeline: PipelineInfo,
    conditioning: Conditioning,
    control: ControlNetInfo | None = None,
) -> None:
    spec = component.spec
    if CONTROLNET_COMPONENT.fullmatch(spec.name):
        return  # a ControlNet's I/O is the U-Net's: check_controlnet
    inputs, outputs = _expected_io(spec.name, pipeline, conditioning, control)
    if sorted(spec.input_names) != sorted(inputs):
        raise ManifestFieldError(
            f"{where}.inputs",
            f"must be exactly {', '.join(inputs)}, what the runtime feeds (got {', '.join(spec.input_names)})",
        )
    missing = [name for name in outputs if name not in spec.output_names]
    if missing:
        raise ManifestFieldError(
            f"{where}.outputs",
            f"must include {', '.join(missing)}, what the runtime reads (got {', '.join(spec.output_names)})",
        )
    for kind, tensors, expected in (("inputs", spec.inputs, inputs), ("outputs", spec.outputs, outputs)):
        for index, tensor in enumerate(tensors):
            if expected.get(tensor.name) is None:
                continue
            at = f"{where}.{kind}[{index}]"
            wanted = expected[tensor.name]
            shapes = wanted if wanted is TIMESTEP_SHAPES else (wanted,)
            if not any(_shape_matches(tensor.shape, shape) for shape in shapes):
                shown = " or ".join(json.dumps(["N" if want == _ANY else want for want in shape]) for shape in shapes)
                raise ManifestFieldError(
                    f"{at}.shape", f"must be {shown} for {tensor.name} (got {json.dumps(list(tensor.shape))})"
                )
            dtypes = ("int64",) if tensor.name == "input_ids" else FLOAT_DTYPES
            if tensor.dtype not in dtypes:
                raise ManifestFieldError(
                    f"{at}.dtype", f"must be {' or '.join(dtypes)} for {tensor.name} (got {tensor.dtype})"
                )


def _tensor(spec: ComponentSpec, name: str) -> TensorSpec:
    return next(tensor for tensor in (*spec.inputs, *spec.outputs) if tensor.name == name)


def check_tensorrt_engine(
    engine: TensorRTEngineDetails, spec: ComponentSpec, pipeline: PipelineInfo, where: str
) -> None:
    """The engine read by :meth:`TensorRTEngineDetails.from_json` against its component: the engine's I/O has
    the spec's names, dtypes and ranks, its profiles are the spec's inputs at their ranks, and its VAE scale
    factor is the pipeline's."""
    fields = {tensor.name: (tensor, f"{where}.io[{index}]") for index, tensor in enumerate(engine.io)}
    for mode, tensors in (("input", spec.inputs), ("output", spec.outputs)):
        names = sorted(tensor.name for tensor in engine.io if tensor.mode == mode)
        if names != sorted(tensor.name for tensor in tensors):
            raise ManifestFieldError(
                f"{where}.io",
                f"must list the spec's {mode}s {', '.join(t.name for t in tensors)} (got {', '.join(names)})",
            )
        for tensor in tensors:
            built, at = fields[tensor.name]
            if (built.dtype, len(built.shape)) != (tensor.dtype, len(tensor.shape)):
                raise ManifestFieldError(
                    at,
                    f"must have the spec's dtype {tensor.dtype} and rank {len(tensor.shape)} "
                    f"(got {describe(built.dtype)} and {len(built.shape)})",
                )
    ranks = {tensor.name: len(tensor.shape) for tensor in spec.inputs}
    for name, low in engine.profiles.minimum.items():
        at = field_path(f"{where}.profiles", name)
        if name not in ranks:
            raise ManifestFieldError(at, f"is not an input of {spec.name} ({', '.join(ranks)})")
        if len(low) != ranks[name]:
            raise ManifestFieldError(f"{at}.min", f"must be a list of exactly {ranks[name]} entries (got {len(low)})")
    if engine.vae_scale_factor != pipeline.vae_scale_factor:
        raise ManifestFieldError(
            f"{where}.vae_scale_factor",
            f"must equal pipeline.vae_scale_factor, {pipeline.vae_scale_factor} (got {engine.vae_scale_factor})",
        )


def check_coreml_package(package: CoreMLPackageDetails, spec: ComponentSpec, where: str) -> None:
    """The package read by :meth:`CoreMLPackageDetails.from_json` against its component: its inputs and outputs
    map one to one onto the spec's (by their spec names)."""
    for key, recorded, tensors in (
        ("coreml_inputs", package.inputs, spec.inputs),
        ("coreml_outputs", package.outputs, spec.outputs),
    ):
        names = [tensor.feed_name for tensor in recorded]
        if sorted(names) != sorted(tensor.name for tensor in tensors):
            raise ManifestFieldError(
                f"{where}.{key}",
                f"must map one to one onto the spec's {', '.join(t.name for t in tensors)} (got {', '.join(names)})",
            )
