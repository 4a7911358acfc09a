"""Run-time adapters: a bundle with LoRA A fused plus adapter B at weight w gives the image of the bundle exported
with A and B both fused, on onnxruntime and OpenVINO (fp32), for SD1.5-family and SDXL tiny models with attention,
convolution and text-encoder LoRAs; switching A+B -> base -> A+B gives each one's own image; the INT8 variant with an
adapter stays close to the INT8 bundle exported with both fused; every bad input is one line.

The SDXL case is the OTHER_SDXL shape (other block counts and head sizes than the default tiny SDXL) with a LoRA
of a rank (3) no other test uses, on both text encoders as well.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest

from lcm_export.errors import ExportError, UserError
from lcm_export.exporter.adapter import make_adapter
from lcm_export.exporter.bundle import LoraSource
from lcm_export.exporter.tiny import TinyPipelineConfig, build_tiny_lora, build_tiny_pipeline
from lcm_export.runtime import Pipeline
from lcm_export.runtime.adapters import AdapterError
from tests.helpers import assert_one_line_error, export, run_module

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")
BACKENDS = ("onnxruntime", "openvino")
EXACT = 1e-4  # max abs between images, fp32
WEIGHT_B = 0.7
# INT8 + adapter against the INT8 bundle exported with both LoRAs fused (measured with 7-bit weights: 37.5 dB
# onnxruntime, 39.1 OpenVINO; the INT8 bundle without the adapter: 29.5)
INT8_PSNR_FLOOR_DB = 32.0
B_TARGETS = ("to_q", "to_out.0", "conv1", "conv2", "proj_in", "ff.net.2")  # attention, 3x3 and 1x1 convolutions


def _images(bundle_or_pipe, backend: str = "onnxruntime", **load) -> np.ndarray:
    pipe = bundle_or_pipe
    if not isinstance(pipe, Pipeline):
        pipe = Pipeline.load(bundle_or_pipe, backend=backend, precision="fp32", **load)
    return pipe("a photo of a cat", negative_prompt="blurry", guidance_scale=1.5, num_inference_steps=2, seed=5).images


def _backend_session(session):
    """The backend session under the runtime's wrappers (a lock, the bound weights or factors)."""
    while "inner" in vars(session):
        session = vars(session)["inner"]
    return session


def _psnr(first: np.ndarray, second: np.ndarray) -> float:
    mse = float(np.mean((first.astype(np.float64) - second) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> dict[str, Path]:
    """A tiny base SD, LoRA A (attention, U-Net and text encoder) fused, LoRA B (rank 3: attention, 3x3 and 1x1
    convolutions, feed-forward, text-encoder q/fc1) as an adapter; the bundles with A and with A+B (B at WEIGHT_B)."""
    folder = tmp_path_factory.mktemp("adapters-sd")
    base = build_tiny_pipeline(folder / "base", TinyPipelineConfig(kind="sd"))
    lora_a = build_tiny_lora(
        folder / "a.safetensors", base, rank=4, alpha=8, target_modules=("to_q", "to_k", "to_v"), text_encoder=True
    )
    lora_b = build_tiny_lora(
        folder / "b.safetensors",
        base,
        rank=3,
        target_modules=B_TARGETS,
        text_encoder=True,
        text_encoder_target_modules=("q_proj", "fc1"),
        seed=2,
    )
    bundle_a = export(base, folder / "bundle-a", loras=(LoraSource(str(lora_a)),))
    bundle_ab = export(base, folder / "bundle-ab", loras=(LoraSource(str(lora_a)), LoraSource(str(lora_b), WEIGHT_B)))
    adapter = folder / "b.adapter"
    make_adapter(LoraSource(str(lora_b)), bundle_a, adapter)
    return {"base": base, "a": lora_a, "b": lora_b, "bundle_a": bundle_a, "bundle_ab": bundle_ab, "adapter": adapter}


@pytest.mark.parametrize(
    ("backend", "mode", "runs_as"),
    [
        ("onnxruntime", "auto", "inputs"),
        ("onnxruntime", "factors", "factors"),
        ("onnxruntime", "rebuild", "rebuild"),
        ("openvino", "auto", "rebuild"),
        ("openvino", "factors", "factors"),
    ],
)
def test_sd_adapter_gives_the_fused_image_and_switches_back(sd, backend, mode, runs_as) -> None:
    fused_a, fused_ab = _images(sd["bundle_a"], backend), _images(sd["bundle_ab"], backend)
    assert np.abs(fused_a - fused_ab).max() > 1e-2  # B changes the image: the comparisons below can fail
    pipe = Pipeline.load(
        sd["bundle_a"], backend=backend, precision="fp32", adapters={sd["adapter"]: WEIGHT_B}, adapter_mode=mode
    )
    assert pipe.adapter_state.modes == {"unet": runs_as, "text_encoder": runs_as}
    assert np.abs(_images(pipe) - fused_ab).max() <= EXACT
    pipe.set_adapters({})  # base (A only) -> exactly A's image, then B again exactly
    assert np.abs(_images(pipe) - fused_a).max() == 0.0
    pipe.set_adapters({sd["adapter"]: WEIGHT_B})
    assert np.abs(_images(pipe) - fused_ab).max() <= EXACT
    assert pipe.adapters == {str(sd["adapter"]): WEIGHT_B}


def test_inputs_mode_switches_on_one_open_session(sd, tmp_path) -> None:
    """With the weights fed as inputs, a switch between adapters opens no session: the weight-inputs graph's
    session stays, and only the weights it is fed change (B at 0.7, then at 0.3: two images, each its own)."""
    pipe = Pipeline.load(sd["bundle_a"], backend="onnxruntime", precision="fp32", adapters={sd["adapter"]: WEIGHT_B})
    graphs = dict(pipe.adapter_state._graphs)
    assert set(graphs) == {("unet", "fp32"), ("text_encoder", "fp32")}
    first = _images(pipe)
    pipe.set_adapters({sd["adapter"]: 0.3})
    assert pipe.adapter_state._graphs == graphs  # the same session objects
    assert all(pipe.denoiser._sessions[name].inner.inner is graphs[(name, "fp32")] for name in ("unet", "text_encoder"))
    low = _images(pipe)
    assert np.abs(low - first).max() > 1e-3
    pipe.set_adapters({sd["adapter"]: WEIGHT_B})
    assert np.abs(_images(pipe) - first).max() == 0.0


def test_adapter_mode_that_cannot_run(sd, tmp_path) -> None:
    """adapter_mode='inputs' where the weights cannot be inputs (OpenVINO), or an unknown mode: one line each, in
    Python and from lcm-run (which writes no image)."""
    refusal = r"adapter_mode='inputs': this backend does not take merged weights as inputs"
    with pytest.raises(AdapterError, match=refusal) as error:
        Pipeline.load(
            sd["bundle_a"], backend="openvino", precision="fp32", adapters={sd["adapter"]: 1.0}, adapter_mode="inputs"
        )
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match=r"^adapter_mode='merge': pick one of auto, factors, inputs, rebuild$"):
        Pipeline.load(sd["bundle_a"], backend="onnxruntime", adapter_mode="merge")
    result = run_module(
        "lcm_export.runtime.cli", sd["bundle_a"], "a cat", "--backend", "openvino", "--adapter", sd["adapter"],
        "--adapter-mode", "inputs", "-o", tmp_path / "y.png",
    )  # fmt: skip
    assert_one_line_error(result, "adapter_mode='inputs'", "load with backend='onnxruntime'")
    assert not (tmp_path / "y.png").exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_factors_switch_binds_new_factors(sd, tmp_path, backend) -> None:
    """With the factors as inputs a switch between adapters of the same ranks keeps the open session (OpenVINO:
    the compiled model; a mix of two adapters, whose ranks add up, compiles once more there); each weight set
    gives its own image, and the mix of B at 0.3 and a copy of B at 0.4 gives B at 0.7 (the fused bundle)."""
    copy = tmp_path / "b-copy.adapter"
    shutil.copy(sd["adapter"], copy)
    pipe = Pipeline.load(
        sd["bundle_a"], backend=backend, precision="fp32", adapters={sd["adapter"]: WEIGHT_B}, adapter_mode="factors"
    )
    assert pipe.adapter_state.modes == {"unet": "factors", "text_encoder": "factors"}
    sessions = {name: kept[1] for name, kept in pipe.adapter_state._factor_graphs.items()}
    first = _images(pipe)
    pipe.set_adapters({sd["adapter"]: 0.3})
    assert {name: kept[1] for name, kept in pipe.adapter_state._factor_graphs.items()} == sessions
    low = _images(pipe)
    assert np.abs(low - first).max() > 1e-3
    pipe.set_adapters({sd["adapter"]: 0.3, copy: WEIGHT_B - 0.3})
    mixed = {name: kept[1] for name, kept in pipe.adapter_state._factor_graphs.items()}
    assert (mixed["unet"] is sessions["unet"]) == (backend == "onnxruntime")  # OpenVINO: other ranks, compiled
    assert np.abs(_images(pipe) - _images(sd["bundle_ab"], backend)).max() <= EXACT
    if backend == "onnxruntime":  # adapters that touch other weights: another graph (other branches cut out)
        other = tmp_path / "a.adapter"
        make_adapter(LoraSource(str(sd["a"])), sd["bundle_a"], other)
        pipe.set_adapters({other: 0.5})
        assert pipe.adapter_state._factor_graphs["unet"][1] is not sessions["unet"]
        assert np.abs(_images(pipe) - first).max() > 1e-3
    pipe.set_adapters({sd["adapter"]: WEIGHT_B})
    kept = {name: kept[1] for name, kept in pipe.adapter_state._factor_graphs.items()}
    pipe.set_adapters({})  # the base: the factor session kept, its factors zero: the base image bit for bit
    assert {name: kept[1] for name, kept in pipe.adapter_state._factor_graphs.items()} == kept
    assert all(_backend_session(pipe.denoiser._sessions[name]) is kept[name] for name in ("unet", "text_encoder"))
    assert pipe.adapter_state.modes == {} and pipe.adapters == {}
    assert np.abs(_images(pipe) - _images(sd["bundle_a"], backend)).max() == 0.0
    pipe.set_adapters({sd["adapter"]: WEIGHT_B})  # and back on the same session
    assert {name: kept[1] for name, kept in pipe.adapter_state._factor_graphs.items()} == kept
    assert np.abs(_images(pipe) - first).max() == 0.0


def test_factor_session_reopens_from_the_cache(sd, tmp_path) -> None:
    """onnxruntime saves the cut factor graph it optimised; the next pipeline's first switch opens that copy (with
    its weights and pre-packed blobs beside it, not the bundle's) and gives the same image."""

    def load():
        return Pipeline.load(
            sd["bundle_a"], backend="onnxruntime", precision="fp32", cache_dir=tmp_path / "cache",
            adapters={sd["adapter"]: WEIGHT_B}, adapter_mode="factors",
        )  # fmt: skip

    first = load()
    assert not any(kept[1].loaded_from_cache for kept in first.adapter_state._factor_graphs.values())
    second = load()
    factor_sessions = second.adapter_state._factor_graphs
    assert set(factor_sessions) == {"unet", "text_encoder"}
    assert all(kept[1].loaded_from_cache for kept in factor_sessions.values())
    assert np.abs(_images(second) - _images(first)).max() == 0.0


def test_factor_graph_cut_to_the_touched_branches(sd) -> None:
    """The runtime cuts the branches of untouched weights out of the factor-inputs graph (ONNX's wire format, no
    onnx package): their nodes and inputs go, their Add becomes an Identity of the layer's output, every other
    node and every initializer stays as written; cut to nothing, the graph computes the base graph's output."""
    import onnxruntime

    from lcm_export.runtime.factor_graph import FactorGraphError, cut_factor_branches

    folder = sd["bundle_a"] / "unet"
    stored = json.loads((folder / "weights.json").read_text())["variants"]["fp32"]
    graph_path = sd["bundle_a"] / stored["factor_inputs_graph"]
    weights = sorted(stored["tensors"][key]["name"] for key in stored["factor_inputs"])
    assert len(weights) > 4
    kept, cut = weights[:2], set(weights[2:])
    full = onnx.load(str(graph_path), load_external_data=False)
    edited = onnx.load_from_string(cut_factor_branches(graph_path.read_bytes(), cut))
    branch_nodes = {f"{weight}.factor_{role}" for weight in weights for role in ("down", "up", "add")}
    assert {node.name for node in edited.graph.node if node.name in branch_nodes} == {
        f"{weight}.factor_{role}" for weight in kept for role in ("down", "up", "add")
    } | {f"{weight}.factor_add" for weight in cut}
    for node in edited.graph.node:
        if node.name.endswith(".factor_add") and node.name.rsplit(".", 1)[0] in cut:
            assert node.op_type == "Identity" and len(node.input) == 1 and node.input[0].endswith(".base")
    assert [value.name for value in edited.graph.input] == [
        value.name for value in full.graph.input if value.name.rsplit(".", 1)[0] not in cut
    ]
    untouched = [n for n in full.graph.node if n.name not in branch_nodes]
    assert [n for n in edited.graph.node if n.name not in branch_nodes] == untouched
    assert list(edited.graph.initializer) == list(full.graph.initializer)

    everything = cut_factor_branches(graph_path.read_bytes(), set(weights))
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    cut_session = onnxruntime.InferenceSession(everything, options, providers=["CPUExecutionProvider"])
    base_session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in cut_session.get_inputs()] == [i.name for i in base_session.get_inputs()]
    rng = np.random.default_rng(0)
    symbols = {"height": 8, "width": 8, "sequence": 7}  # latent size, tokens; every other symbol (batch) 1
    feeds = {
        i.name: rng.standard_normal(
            [d if isinstance(d, int) else next((v for k, v in symbols.items() if k in d), 1) for d in i.shape]
        ).astype(np.float32)
        for i in base_session.get_inputs()
    }
    expected, got = base_session.run(None, feeds)[0], cut_session.run(None, feeds)[0]
    assert expected.shape == got.shape and np.abs(expected - got).max() <= 1e-6

    with pytest.raises(FactorGraphError, match="no branch for"):
        cut_factor_branches(graph_path.read_bytes(), {"not-a-weight"})
    with pytest.raises(FactorGraphError):
        cut_factor_branches(b"\x3a\x05ab", {weights[0]})


def test_factors_mode_without_the_branch_or_the_graph(sd) -> None:
    """adapter_mode='factors' where the weight map's factor-inputs graph has no branch for a weight the adapter
    touches, or where there is no such graph (a bundle exported before them): one line each, and "auto" merges."""
    pipe = Pipeline.load(sd["bundle_a"], backend="onnxruntime", precision="fp32", adapter_mode="factors")
    stored = pipe.adapter_state.weight_maps["unet"].variants["fp32"]
    adapted = {layer.weight for layer in pipe.adapter_state._load(str(sd["adapter"])).layers}
    stored["factor_inputs"] = [name for name in stored["factor_inputs"] if name not in adapted]
    with pytest.raises(AdapterError) as error:
        pipe.set_adapters({sd["adapter"]: WEIGHT_B})
    assert str(error.value) == (
        "adapter_mode='factors': the bundle's unet factor-inputs graph has no branch for some weights they adapt, "
        "or pass adapter_mode='auto'"
    )
    del stored["factor_inputs_graph"]
    with pytest.raises(AdapterError) as error:
        pipe.set_adapters({sd["adapter"]: WEIGHT_B})
    assert str(error.value) == (
        "adapter_mode='factors': the bundle has no factor-inputs graph for its unet: re-export it, "
        "or pass adapter_mode='auto'"
    )
    assert pipe.adapters == {}  # nothing half-applied
    pipe.adapter_state.mode = "auto"
    pipe.set_adapters({sd["adapter"]: WEIGHT_B})
    assert pipe.adapter_state.modes["unet"] == "inputs"
    assert np.abs(_images(pipe) - _images(sd["bundle_ab"])).max() <= EXACT


def test_factors_mode_on_a_graph_without_its_branches(sd) -> None:
    """A weight map whose factor-inputs graph is a listed file (its sha256 checked at load) without the branches
    it promises: one line naming the map and the graph, nothing applied."""
    pipe = Pipeline.load(sd["bundle_a"], backend="onnxruntime", precision="fp32", adapter_mode="factors")
    weight_map = pipe.adapter_state.weight_maps["unet"]
    weight_map.variants["fp32"]["factor_inputs_graph"] = "unet/model.onnx"  # the variant itself: no branch
    with pytest.raises(AdapterError) as error:
        pipe.set_adapters({sd["adapter"]: WEIGHT_B})
    message = str(error.value)
    assert message.startswith(f"weight map '{weight_map.path}' names 'unet/model.onnx', where the factor-inputs graph")
    assert "has no branch for" in message and message.endswith(": re-export the bundle")
    assert "\n" not in message and pipe.adapters == {}


def test_auto_runs_small_adapters_as_factors(sd, monkeypatch) -> None:
    """adapter_mode "auto" runs an adapter as factors when its factors are at most FACTOR_SHARE_AUTO of the
    component's adaptable weights (the tiny model's B is far above 1%: it merges, as the tests above check); the
    share is the factors' elements over the weights' (computed here from the files themselves)."""
    from lcm_export.runtime import adapters

    tensors, _ = adapters.read_safetensors(sd["adapter"])
    weight_map = json.loads((sd["bundle_a"] / "unet" / "weights.json").read_text())
    factors = sum(value.size for key, value in tensors.items() if key.startswith("unet/"))
    share = factors / sum(math.prod(entry["shape"]) for entry in weight_map["weights"].values())
    pipe = Pipeline.load(sd["bundle_a"], backend="onnxruntime", precision="fp32", adapters={sd["adapter"]: WEIGHT_B})
    state = pipe.adapter_state
    assert adapters.factor_shares(state.weight_maps["unet"], list(state.active)) == pytest.approx(share, rel=1e-12)
    assert share > adapters.FACTOR_SHARE_AUTO and state.modes["unet"] == "inputs"
    monkeypatch.setattr(adapters, "FACTOR_SHARE_AUTO", share)
    for backend in BACKENDS:
        pipe = Pipeline.load(sd["bundle_a"], backend=backend, precision="fp32", adapters={sd["adapter"]: WEIGHT_B})
        assert pipe.adapter_state.modes["unet"] == "factors"
        assert np.abs(_images(pipe) - _images(sd["bundle_ab"], backend)).max() <= EXACT


def test_adapters_mix_as_a_sum(sd, tmp_path) -> None:
    """Two adapters at λ1 and λ2 add their deltas: B at 0.3 and a copy of B at 0.4 are B at 0.7."""
    copy = tmp_path / "b-copy.adapter"
    shutil.copy(sd["adapter"], copy)
    pipe = Pipeline.load(sd["bundle_a"], backend="onnxruntime", precision="fp32")
    pipe.set_adapters({sd["adapter"]: 0.3, copy: WEIGHT_B - 0.3})
    assert np.abs(_images(pipe) - _images(sd["bundle_ab"])).max() <= EXACT


def test_weight_map_is_in_the_manifest(sd) -> None:
    manifest = json.loads((sd["bundle_a"] / "manifest.json").read_text())
    listed = {entry["path"] for entry in manifest["files"]}
    for name in ("unet", "text_encoder"):
        assert manifest["components"][name]["weight_map"] == f"{name}/weights.json"
        assert f"{name}/weights.json" in listed
        weight_map = json.loads((sd["bundle_a"] / name / "weights.json").read_text())
        layouts = {entry["layout"] for entry in weight_map["weights"].values()}
        # convolutions as they are, MatMul weights transposed (a text encoder has no convolution)
        assert layouts == ({"same", "transposed"} if name == "unet" else {"transposed"})
        # the fp32 variant's weight-inputs graph: every mapped weight is a graph input, no longer an initializer
        graph_path = weight_map["variants"]["fp32"]["weight_inputs_graph"]
        assert graph_path == f"{name}/model.weight-inputs.onnx" and graph_path in listed
        graph = onnx.load(str(sd["bundle_a"] / graph_path), load_external_data=False).graph
        mapped = {where["name"] for where in weight_map["variants"]["fp32"]["tensors"].values()}
        assert len(mapped) == len(weight_map["weights"])
        assert mapped <= {value.name for value in graph.input}
        assert not mapped & {tensor.name for tensor in graph.initializer}
        # the factor-inputs graph: every mapped weight still an initializer, each with a branch of two factor
        # inputs of a symbolic rank beside it, in the layouts the runtime feeds (bundle-format.md)
        variant = weight_map["variants"]["fp32"]
        factor_path = variant["factor_inputs_graph"]
        assert factor_path == f"{name}/model.factor-inputs.onnx" and factor_path in listed
        assert sorted(variant["factor_inputs"]) == sorted(weight_map["weights"])
        factor_graph = onnx.load(str(sd["bundle_a"] / factor_path), load_external_data=False).graph
        assert mapped <= {tensor.name for tensor in factor_graph.initializer}
        inputs = {value.name: value.type.tensor_type.shape.dim for value in factor_graph.input}
        for key, where in variant["tensors"].items():
            down, up = inputs[f"{where['name']}.down"], inputs[f"{where['name']}.up"]
            entry = weight_map["weights"][key]
            torch_shape = entry["shape"][::-1] if entry["layout"] == "transposed" else entry["shape"]
            if entry["kind"] == "linear":
                assert [d.dim_value for d in down][:1] == [torch_shape[1]] and down[1].dim_param
                assert up[0].dim_param == down[1].dim_param and up[1].dim_value == torch_shape[0]
            else:
                assert down[0].dim_param and [d.dim_value for d in down[1:]] == torch_shape[1:]
                assert [d.dim_value for d in up] == [torch_shape[0], 0, 1, 1] and up[1].dim_param == down[0].dim_param
    assert "weight_map" not in manifest["components"]["vae_decoder"]


def _frames(count: int, size: int = 32) -> list[np.ndarray]:
    """Frames (H, W, 3) in [0, 1] that differ from each other."""
    generator = np.random.default_rng(3)
    return [generator.random((size, size, 3), dtype=np.float32) for _ in range(count)]


def test_stream_switches_between_frames_only(sd) -> None:
    """The frame loop: a switch between frames gives the next frame of a stream started on the new weights (its
    prompt encoded again: B adapts the text encoder too); a step-batched stream with frames in flight refuses the
    switch in one line, keeps its weights, and switches once flushed."""
    first, second = _frames(2)
    options = {"strength": 0.6, "num_inference_steps": 4, "seed": 4}  # 4 steps: a batched push holds frames
    with_b = Pipeline.load(sd["bundle_a"], backend="onnxruntime", precision="fp32", adapters={sd["adapter"]: WEIGHT_B})
    expected_b = with_b.stream("a cat", **options, batch_steps=False)(second)
    pipe = Pipeline.load(sd["bundle_a"], backend="onnxruntime", precision="fp32")
    expected_base = pipe.stream("a cat", **options, batch_steps=False)(second)
    assert np.abs(expected_b - expected_base).max() > 1e-2  # the adapter changes the frame: the checks can fail
    stream = pipe.stream("a cat", **options, batch_steps=False)
    stream(first)
    pipe.set_adapters({sd["adapter"]: WEIGHT_B})
    assert np.abs(stream(second) - expected_b).max() <= EXACT
    pipe.set_adapters({})
    assert np.abs(stream(second) - expected_base).max() == 0.0

    batched = pipe.stream("a cat", **options, batch_steps=True)
    assert batched.push(first) is None and batched.frames_in_flight == 1
    with pytest.raises(AdapterError, match=r"^set_adapters: 1 frame\(s\) of a step-batched stream are in flight .*"
                       r"call the stream's flush\(\) first$"):  # fmt: skip
        pipe.set_adapters({sd["adapter"]: WEIGHT_B})
    assert pipe.adapters == {}
    (flushed,) = batched.flush()
    assert np.abs(flushed - pipe.stream("a cat", **options, batch_steps=False)(first)).max() <= EXACT
    pipe.set_adapters({sd["adapter"]: WEIGHT_B})
    assert batched.push(second) is None
    (flushed,) = batched.flush()
    assert np.abs(flushed - expected_b).max() <= EXACT


# -- SDXL, an unseen shape -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdxl_adapter_gives_the_fused_image(other_sdxl_bundle, sdxl_ab_bundle, backend) -> None:
    bundle_ab, adapter = sdxl_ab_bundle
    fused = _images(bundle_ab, backend)
    assert np.abs(_images(other_sdxl_bundle, backend) - fused).max() > 1e-2
    for mode in ("auto", "factors"):
        pipe = Pipeline.load(
            other_sdxl_bundle, backend=backend, precision="fp32", adapters={adapter: 0.5}, adapter_mode=mode
        )
        assert set(pipe.adapter_state.modes) == {"unet", "text_encoder", "text_encoder_2"}
        assert np.abs(_images(pipe) - fused).max() <= EXACT, mode


@pytest.fixture(scope="module")
def sdxl_ab_bundle(other_sdxl_model, other_sdxl_bundle, tmp_path_factory) -> tuple[Path, Path]:
    """OTHER_SDXL with its LoRA at 0.9 and a rank-3 LoRA B (attention + convolutions + both text encoders) at 0.5
    fused; and B as an adapter for the bundle with only the first LoRA."""
    base, lora = other_sdxl_model
    folder = tmp_path_factory.mktemp("adapters-sdxl")
    lora_b = build_tiny_lora(
        folder / "b.safetensors", base, rank=3, target_modules=B_TARGETS, text_encoder=True, seed=9
    )
    bundle = export(base, folder / "bundle-ab", loras=(LoraSource(str(lora), 0.9), LoraSource(str(lora_b), 0.5)))
    adapter = folder / "b.adapter"
    make_adapter(LoraSource(str(lora_b)), other_sdxl_bundle, adapter)
    return bundle, adapter


# -- INT8 ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_bundles(sd, tmp_path_factory) -> tuple[Path, Path, Path]:
    """The INT8 bundles (U-Net and VAE decoder QDQ; 1 calibration prompt, no VAE encoder) with A and with A+B
    fused; B as an adapter for the first."""
    folder = tmp_path_factory.mktemp("adapters-int8")
    options = {"precision": "int8", "calibration_size": 1, "components": ("text_encoder", "unet", "vae_decoder")}
    bundle_a = export(sd["base"], folder / "int8-a", loras=(LoraSource(str(sd["a"])),), **options)
    bundle_ab = export(
        sd["base"], folder / "int8-ab", loras=(LoraSource(str(sd["a"])), LoraSource(str(sd["b"]), WEIGHT_B)), **options
    )
    adapter = folder / "b.adapter"
    make_adapter(LoraSource(str(sd["b"])), bundle_a, adapter)
    return bundle_a, bundle_ab, adapter


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_adapter_is_close_to_the_int8_bundle_fused(int8_bundles, backend) -> None:
    bundle_a, bundle_ab, adapter = int8_bundles
    fused = _images(bundle_ab, backend)
    without = _images(bundle_a, backend)
    pipe = Pipeline.load(bundle_a, backend=backend, precision="fp32", adapters={adapter: WEIGHT_B})
    assert pipe.variants["unet"].precision == "int8"
    adapted = _images(pipe)
    print(f"{backend}: INT8+adapter vs INT8 fused {_psnr(adapted, fused):.2f} dB, without {_psnr(without, fused):.2f}")
    assert _psnr(adapted, fused) >= INT8_PSNR_FLOOR_DB
    assert _psnr(adapted, fused) > _psnr(without, fused) + 3  # the adapter, not the base, is what gets close


def _stored(bundle: Path, where: dict) -> np.ndarray:
    """A tensor at its weight-map location, read as the bytes say."""
    count = math.prod(where["shape"]) if where["shape"] else 1
    values = np.fromfile(bundle / where["file"], dtype=where["dtype"], count=count, offset=where["offset"])
    return values.reshape(where["shape"])


@pytest.mark.slow
def test_factors_mode_where_it_cannot_run(int8_bundles, tmp_path) -> None:
    """adapter_mode='factors' on an INT8 variant: one line saying what to load instead; "auto" merges there."""
    bundle_a, _, adapter = int8_bundles
    with pytest.raises(AdapterError) as error:
        Pipeline.load(
            bundle_a, backend="onnxruntime", precision="fp32", adapters={adapter: 1.0}, adapter_mode="factors"
        )
    assert str(error.value) == (
        "adapter_mode='factors': the text_encoder runs an int8 variant: load with variant='fp32', or pass "
        "adapter_mode='auto'"
    )
    result = run_module(
        "lcm_export.runtime.cli", bundle_a, "a cat", "--adapter", adapter, "--adapter-mode", "factors",
        "-o", tmp_path / "y.png",
    )  # fmt: skip
    assert_one_line_error(
        result, "adapter_mode='factors': the text_encoder runs an int8 variant", "load with variant='fp32'"
    )
    assert not (tmp_path / "y.png").exists()
    pipe = Pipeline.load(bundle_a, backend="onnxruntime", precision="fp32", adapters={adapter: 1.0})
    assert pipe.adapter_state.modes["unet"] == "rebuild"


@pytest.mark.slow
def test_int8_requantisation_uses_the_recipes_range(int8_bundles) -> None:
    """Requantising an INT8 variant's own dequantised weights with the range its recipe records gives back the
    quantizer's bytes exactly (7-bit weights: [-64, 64], scale max|W|/64); the full 8-bit range would not."""
    from lcm_export.runtime.adapters import int8_weight_levels, requantized

    bundle_a = int8_bundles[0]
    manifest = json.loads((bundle_a / "manifest.json").read_text())
    variant = next(v for v in manifest["components"]["unet"]["variants"] if v["precision"] == "int8")
    assert variant["produced_by"]["recipe"]["reduce_range"] is True
    levels = int8_weight_levels(variant["produced_by"])
    assert levels == 64.0
    tensors = json.loads((bundle_a / "unet" / "weights.json").read_text())["variants"][variant["name"]]["tensors"]
    checked = 0
    for where in tensors.values():
        if where["dtype"] != "int8":
            continue
        quantized, scale = _stored(bundle_a, where), _stored(bundle_a, where["scale"]).astype(np.float32)
        axis = where["axis"] % quantized.ndim
        shape = [-1 if index == axis else 1 for index in range(quantized.ndim)]
        assert np.abs(quantized.astype(np.int32)).max() <= levels
        merged = quantized.astype(np.float32) * scale.reshape(shape)
        again, again_scale = requantized(merged, scale, axis, levels)
        assert np.array_equal(again, quantized) and np.allclose(again_scale, scale, rtol=1e-6, atol=0)
        full, _ = requantized(merged, scale, axis, int8_weight_levels({}))
        assert not np.array_equal(full, quantized)
        checked += 1
    assert checked >= 4


# -- bad input: one line each --------------------------------------------------------------------------------------


def test_adapter_for_another_bundle(sd, other_sdxl_bundle) -> None:
    for bundle in (sd["bundle_ab"], other_sdxl_bundle):  # same architecture other weights; another architecture
        with pytest.raises(AdapterError, match=r"was made for another bundle \(its (text_encoder|unet) "):
            Pipeline.load(bundle, backend="onnxruntime", adapters={sd["adapter"]: 1.0})


def test_non_finite_or_wrong_weights(sd) -> None:
    pipe = Pipeline.load(sd["bundle_a"], backend="onnxruntime")
    for weight in (float("nan"), float("inf"), "0.5", True):
        with pytest.raises(AdapterError, match=r"is not a finite number: pass e\.g\. 0\.8"):
            pipe.set_adapters({sd["adapter"]: weight})
    with pytest.raises(AdapterError, match=r"pass a dict"):
        pipe.set_adapters([sd["adapter"]])
    assert pipe.adapters == {}


def _rewrite_adapter(source: Path, target: Path, change) -> Path:
    """A copy of the adapter file with its header changed by ``change(header)`` (data kept)."""
    raw = source.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    change(header)
    encoded = json.dumps(header).encode()
    target.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + size :])
    return target


def test_rank_or_shape_that_does_not_fit(sd, tmp_path) -> None:
    def reshape_one(header: dict) -> None:
        key = next(name for name in header if name.endswith(".down") and len(header[name]["shape"]) == 2)
        rows, columns = header[key]["shape"]
        header[key]["shape"] = [rows * columns // 1, 1] if columns > 1 else [1, rows]  # same bytes, other shape

    broken = _rewrite_adapter(sd["adapter"], tmp_path / "shape.adapter", reshape_one)
    with pytest.raises(AdapterError, match=r"factors \[.*\] x \[.*\] do not fit the weight \[.*\]"):
        Pipeline.load(sd["bundle_a"], backend="onnxruntime", adapters={broken: 1.0})


def test_not_an_adapter_file(sd) -> None:
    with pytest.raises(AdapterError, match="is not an lcm-export adapter file"):
        Pipeline.load(sd["bundle_a"], backend="onnxruntime", adapters={sd["b"]: 1.0})  # the LoRA itself


def test_cli_lines(sd, tmp_path) -> None:
    """lcm-export adapter and lcm-run --adapter: one line each for a LoRA matching nothing, a LoRA of another
    architecture, a non-finite weight, an adapter for another bundle; and a working run."""
    from safetensors.numpy import save_file

    nothing = tmp_path / "nothing.safetensors"
    save_file(
        {
            "lora_unet_no_such_block.lora_down.weight": np.zeros((2, 8), np.float32),
            "lora_unet_no_such_block.lora_up.weight": np.zeros((8, 2), np.float32),
        },
        str(nothing),
    )
    result = run_module("lcm_export.exporter.cli", "adapter", nothing, "--bundle", sd["bundle_a"], "-o", tmp_path / "x")
    assert_one_line_error(result, "none of its 1 layers matches a module of this pipeline")
    assert not (tmp_path / "x").exists()
    result = run_module(
        "lcm_export.runtime.cli", sd["bundle_a"], "a cat", "--adapter", f"{sd['adapter']}:nan", "-o", tmp_path / "y.png"
    )
    assert_one_line_error(result, "weight 'nan' is not a finite number")
    result = run_module(
        "lcm_export.runtime.cli", sd["bundle_ab"], "a cat", "--adapter", sd["adapter"], "-o", tmp_path / "y.png"
    )
    assert_one_line_error(result, "was made for another bundle")
    assert not (tmp_path / "y.png").exists()
    result = run_module(
        "lcm_export.runtime.cli", sd["bundle_a"], "a cat", "--adapter", f"{sd['adapter']}:0.5", "--steps", "1",
        "-o", tmp_path / "z.png",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "z.png").is_file()


def test_lora_of_another_architecture(sd, other_sdxl_model) -> None:
    _, sdxl_lora = other_sdxl_model
    with pytest.raises(ExportError, match="this LoRA is for a different architecture"):
        make_adapter(LoraSource(str(sdxl_lora)), sd["bundle_a"], sd["bundle_a"].parent / "never.adapter")
    assert not (sd["bundle_a"].parent / "never.adapter").exists()
