"""Component specs and shape ranges (``lcm_export.runtime.specs``): symbolic shapes, ONNX dynamic axes, engine
profiles and their JSON form."""

from __future__ import annotations

import json

import pytest

from lcm_export.runtime.specs import (
    SYMBOLS,
    ComponentProfiles,
    ComponentSpec,
    ManifestFieldError,
    ShapeRange,
    TensorSpec,
)

LATENT_CHANNELS = 4
CROSS_ATTENTION_DIM = 32
TIME_COND_DIM = 16
VAE_SCALE_FACTOR = 8


def unet_like_spec(batch_multiplier: int = 2) -> ComponentSpec:
    """A U-Net as the exporter declares it: a scalar timestep, a fixed channel dim, a CFG batch."""
    return ComponentSpec(
        name="unet",
        inputs=(
            TensorSpec("sample", "float32", ("batch", LATENT_CHANNELS, "latent_height", "latent_width")),
            TensorSpec("timestep", "float32", ()),
            TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", CROSS_ATTENTION_DIM)),
            TensorSpec("timestep_cond", "float32", ("batch", TIME_COND_DIM)),
        ),
        outputs=(TensorSpec("out_sample", "float32", ("batch", LATENT_CHANNELS, "latent_height", "latent_width")),),
        batch_multiplier=batch_multiplier,
    )


def text_encoder_spec() -> ComponentSpec:
    return ComponentSpec(
        name="text_encoder",
        inputs=(TensorSpec("input_ids", "int64", ("batch", "sequence")),),
        outputs=(
            TensorSpec("last_hidden_state", "float32", ("batch", "sequence", CROSS_ATTENTION_DIM)),
            TensorSpec("pooler_output", "float32", ("batch", CROSS_ATTENTION_DIM)),
        ),
        batch_multiplier=2,
    )


# -- TensorSpec ---------------------------------------------------------------------------------------------------


def test_tensor_dynamic_axes_are_the_symbolic_dims() -> None:
    sample = TensorSpec("sample", "float32", ("batch", LATENT_CHANNELS, "latent_height", "latent_width"))
    assert sample.dynamic_axes() == {0: "batch", 2: "latent_height", 3: "latent_width"}
    assert TensorSpec("timestep", "float32", ()).dynamic_axes() == {}
    assert TensorSpec("fixed", "float32", (2, 3)).dynamic_axes() == {}
    assert TensorSpec("hidden", "float32", (1, "sequence", 8)).dynamic_axes() == {1: "sequence"}


def test_tensor_concrete_shape_replaces_every_symbol() -> None:
    values = {"batch": 3, "latent_height": 5, "latent_width": 7, "sequence": 11}
    sample = TensorSpec("sample", "float32", ("batch", LATENT_CHANNELS, "latent_height", "latent_width"))
    assert sample.concrete_shape(values) == (values["batch"], LATENT_CHANNELS, values["latent_height"], 7)
    assert TensorSpec("timestep", "float32", ()).concrete_shape(values) == ()
    assert TensorSpec("fixed", "float32", (2, 3)).concrete_shape({}) == (2, 3)
    with pytest.raises(KeyError, match="image_height"):
        TensorSpec("image", "float32", ("batch", 3, "image_height", "image_width")).concrete_shape(values)


# -- ComponentSpec ------------------------------------------------------------------------------------------------


def test_component_dynamic_axes_cover_inputs_and_outputs_with_symbols() -> None:
    spec = unet_like_spec()
    axes = spec.dynamic_axes()
    # Every tensor with a symbolic dim, inputs and outputs alike; the scalar timestep has none and is left out.
    assert set(axes) == {"sample", "encoder_hidden_states", "timestep_cond", "out_sample"}
    for tensor in (*spec.inputs, *spec.outputs):
        if tensor.name in axes:
            assert axes[tensor.name] == tensor.dynamic_axes()
            assert all(tensor.shape[axis] == symbol for axis, symbol in axes[tensor.name].items())
    assert axes["encoder_hidden_states"] == {0: "batch", 1: "sequence"}


def test_component_input_shapes_are_the_inputs_only_in_order() -> None:
    spec = unet_like_spec()
    values = {"batch": 2, "sequence": 77, "latent_height": 8, "latent_width": 12}
    shapes = spec.input_shapes(values)
    assert list(shapes) == spec.input_names
    assert shapes == {
        "sample": (values["batch"], LATENT_CHANNELS, values["latent_height"], values["latent_width"]),
        "timestep": (),
        "encoder_hidden_states": (values["batch"], values["sequence"], CROSS_ATTENTION_DIM),
        "timestep_cond": (values["batch"], TIME_COND_DIM),
    }
    assert "out_sample" not in shapes


def test_with_dtypes_converts_float_tensors_only_and_keeps_the_rest() -> None:
    spec = ComponentSpec(
        name="mixed",
        inputs=(
            TensorSpec("input_ids", "int64", ("batch", "sequence")),
            TensorSpec("sample", "float32", ("batch", 4, "latent_height", "latent_width")),
        ),
        outputs=(TensorSpec("out", "float32", ("batch", 4)), TensorSpec("ids", "int32", ("batch",))),
        batch_multiplier=2,
    )
    half = spec.with_dtypes("float16")
    assert [t.dtype for t in half.inputs] == ["int64", "float16"]
    assert [t.dtype for t in half.outputs] == ["float16", "int32"]
    assert [(t.name, t.shape) for t in (*half.inputs, *half.outputs)] == [
        (t.name, t.shape) for t in (*spec.inputs, *spec.outputs)
    ]
    assert (half.name, half.batch_multiplier) == ("mixed", 2)
    # The original is untouched (frozen dataclasses), and converting back gives it again.
    assert [t.dtype for t in spec.inputs] == ["int64", "float32"]
    assert half.with_dtypes("float32") == spec


# -- ShapeRange ---------------------------------------------------------------------------------------------------


def test_static_range_has_one_value_per_dim() -> None:
    shape_range = ShapeRange.static(3, 256, 384, sequence=64)
    assert shape_range == ShapeRange((3, 3, 3), (256, 256, 256), (384, 384, 384), 64)
    assert shape_range.is_static
    assert ShapeRange.static(1, 512, 512).sequence == 77
    for dynamic in (
        ShapeRange((1, 2, 4), (512,) * 3, (512,) * 3),
        ShapeRange((1,) * 3, (256, 512, 512), (512,) * 3),
        ShapeRange((1,) * 3, (512,) * 3, (512, 512, 768)),
    ):
        assert not dynamic.is_static, dynamic


@pytest.mark.parametrize("batch_multiplier", [1, 2])
def test_symbol_values_multiply_opt_and_max_batch_but_not_min(batch_multiplier: int) -> None:
    shape_range = ShapeRange(batch=(1, 2, 4), height=(256, 512, 768), width=(320, 640, 1024), sequence=77)
    for index, which in enumerate(("min", "opt", "max")):
        values = shape_range.symbol_values(which, VAE_SCALE_FACTOR, batch_multiplier)
        # guidance <= 1 runs a CFG component without its unconditional half: its minimum stays one image's batch.
        factor = 1 if which == "min" else batch_multiplier
        latent = values["latent_height"], values["latent_width"]
        for down in (2, 4, 8, 16, 32):  # a ControlNet's residuals at the U-Net's lower resolutions (ceil)
            assert (values.pop(f"latent_height_{down}"), values.pop(f"latent_width_{down}")) == (
                -(-latent[0] // down),
                -(-latent[1] // down),
            )
        assert values == {
            "batch": shape_range.batch[index] * factor,
            "sequence": shape_range.sequence,
            "image_height": shape_range.height[index],
            "image_width": shape_range.width[index],
            "latent_height": shape_range.height[index] // VAE_SCALE_FACTOR,
            "latent_width": shape_range.width[index] // VAE_SCALE_FACTOR,
        }, which
    assert shape_range.symbol_values("max", VAE_SCALE_FACTOR) == shape_range.symbol_values("max", VAE_SCALE_FACTOR, 1)
    with pytest.raises(ValueError):
        shape_range.symbol_values("median", VAE_SCALE_FACTOR)


def test_static_cfg_range_min_is_one_image_batch() -> None:
    values = {
        which: ShapeRange.static(2, 64, 64).symbol_values(which, 8, 2)["batch"] for which in ("min", "opt", "max")
    }
    assert values == {"min": 2, "opt": 4, "max": 4}
    # Every symbol a spec may use has a value.
    assert set(ShapeRange.static(2, 64, 64).symbol_values("opt", 8)) == set(SYMBOLS)
    assert {"batch", "latent_height", "latent_width_8"} <= set(SYMBOLS)


# -- ComponentProfiles --------------------------------------------------------------------------------------------


def test_profiles_of_a_cfg_unet() -> None:
    spec = unet_like_spec(batch_multiplier=2)
    shape_range = ShapeRange(batch=(1, 2, 3), height=(256, 512, 768), width=(256, 512, 1024), sequence=77)
    profiles = ComponentProfiles.derive(spec, shape_range, VAE_SCALE_FACTOR)

    def expected(batch: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        latent = (height // VAE_SCALE_FACTOR, width // VAE_SCALE_FACTOR)
        return {
            "sample": (batch, LATENT_CHANNELS, *latent),
            "timestep": (),
            "encoder_hidden_states": (batch, shape_range.sequence, CROSS_ATTENTION_DIM),
            "timestep_cond": (batch, TIME_COND_DIM),
        }

    assert profiles.minimum == expected(1, 256, 256)  # min batch 1x: guidance off
    assert profiles.optimum == expected(2 * 2, 512, 512)
    assert profiles.maximum == expected(3 * 2, 768, 1024)
    assert profiles.maximum["sample"] == (6, LATENT_CHANNELS, 96, 128)
    # min <= opt <= max in every dim of every input: what TensorRT requires of a profile.
    for name in spec.input_names:
        for low, opt, high in zip(profiles.minimum[name], profiles.optimum[name], profiles.maximum[name], strict=True):
            assert low <= opt <= high, name

    data = json.loads(json.dumps(profiles.to_json()))
    assert list(data) == spec.input_names
    assert data["sample"] == {
        "min": list(profiles.minimum["sample"]),
        "opt": list(profiles.optimum["sample"]),
        "max": list(profiles.maximum["sample"]),
    }
    assert data["timestep"] == {"min": [], "opt": [], "max": []}


def test_profiles_without_cfg_follow_the_range() -> None:
    spec = unet_like_spec(batch_multiplier=1)
    shape_range = ShapeRange(batch=(1, 2, 3), height=(256, 512, 768), width=(256, 512, 1024))
    profiles = ComponentProfiles.derive(spec, shape_range, VAE_SCALE_FACTOR)
    assert [p["sample"][0] for p in (profiles.minimum, profiles.optimum, profiles.maximum)] == list(shape_range.batch)


def test_static_profiles_are_one_shape() -> None:
    spec = text_encoder_spec()
    profiles = ComponentProfiles.derive(spec, ShapeRange.static(1, 512, 512, sequence=77), VAE_SCALE_FACTOR)
    assert profiles.minimum == {"input_ids": (1, 77)}
    assert profiles.optimum == profiles.maximum == {"input_ids": (2, 77)}  # CFG: both halves at opt/max


# -- JSON ---------------------------------------------------------------------------------------------------------


def roundtrip(data):
    return json.loads(json.dumps(data))


@pytest.mark.parametrize(
    "tensor",
    [
        TensorSpec("sample", "float32", ("batch", 4, "latent_height", "latent_width")),
        TensorSpec("timestep", "float32", ()),
        TensorSpec("input_ids", "int64", ("batch", "sequence")),
        TensorSpec("text_embeds", "float16", (2, 1280)),
    ],
)
def test_tensor_json_roundtrip(tensor: TensorSpec) -> None:
    assert TensorSpec.from_json(roundtrip(tensor.to_json())) == tensor


@pytest.mark.parametrize("spec", [unet_like_spec(2), unet_like_spec(1), text_encoder_spec()])
def test_component_json_roundtrip(spec: ComponentSpec) -> None:
    data = roundtrip(spec.to_json())
    assert set(data) == {"inputs", "outputs", "batch_multiplier"}  # the name is the manifest's key
    assert ComponentSpec.from_json(spec.name, data) == spec
    assert ComponentSpec.from_json(spec.name, data).dynamic_axes() == spec.dynamic_axes()


def test_component_json_keeps_converted_dtypes() -> None:
    spec = unet_like_spec().with_dtypes("float16")
    assert ComponentSpec.from_json("unet", roundtrip(spec.to_json())) == spec


@pytest.mark.parametrize(
    "shape_range",
    [
        ShapeRange(),
        ShapeRange.static(2, 256, 384, sequence=64),
        ShapeRange(batch=(1, 2, 4), height=(256, 512, 768), width=(256, 512, 1024), sequence=77),
    ],
)
def test_shape_range_json_roundtrip(shape_range: ShapeRange) -> None:
    restored = ShapeRange.from_json(roundtrip(shape_range.to_json()))
    assert restored == shape_range
    assert restored.is_static == shape_range.is_static


def test_shape_range_json_defaults_sequence_to_77() -> None:
    data = roundtrip(ShapeRange.static(1, 64, 64, sequence=12).to_json())
    del data["sequence"]
    assert ShapeRange.from_json(data).sequence == 77


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["inputs"][0]["shape"].__setitem__(0, "batches"), "components.unet.inputs[0].shape[0]"),
        (lambda d: d["inputs"][0]["shape"].__setitem__(1, 0), "components.unet.inputs[0].shape[1]"),
        (lambda d: d["inputs"][1].__setitem__("dtype", "float64"), "components.unet.inputs[1].dtype"),
        (lambda d: d["outputs"][0].__setitem__("name", "sample"), "components.unet.outputs[0].name"),
        (lambda d: d.__setitem__("batch_multiplier", 3), "components.unet.batch_multiplier"),
        (lambda d: d.__setitem__("inputs", []), "components.unet.inputs"),
    ],
)
def test_component_json_rejects_bad_shapes_naming_the_field(mutate, field: str) -> None:
    data = roundtrip(unet_like_spec().to_json())
    mutate(data)
    with pytest.raises(ManifestFieldError) as error:
        ComponentSpec.from_json("unet", data)
    assert error.value.field == field


@pytest.mark.parametrize(
    ("key", "value"),
    [("batch", [2, 1, 4]), ("height", [512, 512]), ("width", [0, 512, 512]), ("height", [256, 512, 384])],
)
def test_shape_range_json_rejects_bad_spans(key: str, value: list[int]) -> None:
    data = roundtrip(ShapeRange().to_json())
    data[key] = value
    with pytest.raises(ManifestFieldError) as error:
        ShapeRange.from_json(data, "shapes")
    assert error.value.field.startswith(f"shapes.{key}")
