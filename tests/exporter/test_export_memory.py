"""The exporter holds one component's weights at a time (issue 17: an SDXL U-Net is 10.3 GB in fp32).

Checked with hooks on a tiny SDXL-shaped export: which pipeline modules hold weights when each component is traced
and when onnxruntime opens each exported file to check it. The figures on full-size models are in bench/RESULTS.md
("SDXL-shaped export memory").
"""

from __future__ import annotations

import numpy as np
import pytest

from lcm_export.exporter.loading import is_skeleton
from tests.helpers import export

MODULES = ("text_encoder", "text_encoder_2", "unet", "vae")


def _modules_with_weights(loaded) -> set[str]:
    return {name for name in MODULES if not is_skeleton(getattr(loaded.pipeline, name))}


def test_each_module_is_loaded_for_its_component_and_freed_before_its_check(sdxl_lcm_dir, tmp_path, monkeypatch):
    import onnxruntime
    import torch

    from lcm_export.exporter import bundle

    captured = {}
    load_pipeline = bundle.load_pipeline

    def capturing_load(*args, **kwargs):
        captured["loaded"] = load_pipeline(*args, **kwargs)
        assert _modules_with_weights(captured["loaded"]) == set()  # loading reads configs, no weights
        return captured["loaded"]

    traced, checked = [], []
    torch_export, session_class = torch.onnx.export, onnxruntime.InferenceSession

    def recording_export(module, *args, **kwargs):
        traced.append(_modules_with_weights(captured["loaded"]))
        return torch_export(module, *args, **kwargs)

    def recording_session(path, *args, **kwargs):
        checked.append((str(path).split("/")[-2], _modules_with_weights(captured["loaded"])))
        return session_class(path, *args, **kwargs)

    monkeypatch.setattr(bundle, "load_pipeline", capturing_load)
    monkeypatch.setattr(torch.onnx, "export", recording_export)
    monkeypatch.setattr(onnxruntime, "InferenceSession", recording_session)
    export(sdxl_lcm_dir, tmp_path / "bundle")

    # Traced with only its own module in memory; the VAE serves the decoder, then the encoder.
    assert traced == [{"text_encoder"}, {"text_encoder_2"}, {"unet"}, {"vae"}, {"vae"}]
    # Checked by onnxruntime with that module freed (the VAE once its encoder, the last to use it, is traced).
    assert checked == [
        ("text_encoder", set()),
        ("text_encoder_2", set()),
        ("unet", set()),
        ("vae_decoder", {"vae"}),
        ("vae_encoder", set()),
    ]


def test_a_module_loads_with_its_checkpoint_pages_released_and_the_same_weights(tiny_lcm_dir, tmp_path, monkeypatch):
    """The exporter's load reclaims the checkpoint's mapped pages while the library copies from them (the
    SDXL-shaped U-Net: 15.47 GB peak RSS without, 10.48 GB with), under the folders the process maps them from: the
    module's folder and, where its files are links (the Hugging Face cache), their targets' folder. The weights
    are the library's own load's."""
    import json

    import torch
    from diffusers import UNet2DConditionModel

    from lcm_export.exporter import loading
    from lcm_export.runtime.backends import mapped_files

    folder, blobs = tmp_path / "snapshot" / "unet", tmp_path / "blobs"
    folder.mkdir(parents=True)
    blobs.mkdir()
    for file in (tiny_lcm_dir / "unet").iterdir():  # laid out as the Hugging Face cache lays a snapshot out
        (blobs / file.name).write_bytes(file.read_bytes())
        (folder / file.name).symlink_to(blobs / file.name)
    seen = []
    released_while = mapped_files.released_while

    def recording(roots, interval=mapped_files.INTERVAL_SECONDS, private=False):
        seen.append((list(roots), private))
        return released_while(roots, interval, private)

    monkeypatch.setattr(mapped_files, "released_while", recording)
    entry = json.loads((tiny_lcm_dir / "model_index.json").read_text())["unet"]
    module = loading.load_module(folder, entry)

    assert seen == [([folder.resolve(), blobs.resolve()], True)]
    expected = UNet2DConditionModel.from_pretrained(str(tiny_lcm_dir / "unet"), torch_dtype=torch.float32)
    ours, theirs = module.state_dict(), expected.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[key].dtype == torch.float32 and torch.equal(ours[key], theirs[key]) for key in ours)


def test_a_released_module_is_not_loaded_again(tiny_lcm_dir) -> None:
    """Reloading from disk would silently drop what was done in memory (fused LoRAs, attention processors)."""
    from lcm_export.exporter.loading import load_pipeline

    loaded = load_pipeline(str(tiny_lcm_dir))
    unet = loaded.module("unet")
    assert not is_skeleton(unet) and loaded.module("unet") is unet  # loaded once, then reused
    loaded.release("unet")
    assert is_skeleton(unet) and loaded.unet.config.in_channels == 4  # weights gone, config kept
    with pytest.raises(RuntimeError, match="released"):
        loaded.module("unet")


def test_repack_moves_per_tensor_files_into_one_aligned_file(tmp_path) -> None:
    """torch writes one file per tensor past 2 GB; repacking scratch deletes each once copied (disk held once)."""
    import onnx
    from onnx import helper, numpy_helper

    from lcm_export.exporter.onnx_export import repack_onnx

    rng = np.random.default_rng(0)
    weights = {f"w{index}": rng.standard_normal((64, 64)).astype(np.float32) for index in range(3)}
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["y0"])]
    nodes += [helper.make_node("MatMul", [f"y{index - 1}", f"w{index}"], [f"y{index}"]) for index in (1, 2)]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y2", onnx.TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    onnx.save_model(
        helper.make_model(graph), str(scratch / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=False
    )
    assert len(list(scratch.iterdir())) == 4  # the graph and one file per tensor

    output = tmp_path / "out" / "model.onnx"
    repack_onnx(scratch / "model.onnx", output, consume=True)
    assert [path.name for path in scratch.iterdir()] == ["model.onnx"]  # every data file deleted once copied
    assert sorted(path.name for path in output.parent.iterdir()) == ["model.onnx", "model.onnx_data"]
    model = onnx.load(str(output))
    for tensor in model.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), weights[tensor.name])
    offsets = [
        int(entry.value)
        for tensor in onnx.load(str(output), load_external_data=False).graph.initializer
        for entry in tensor.external_data
        if entry.key == "offset"
    ]
    assert len(offsets) == 3 and all(offset % 4096 == 0 for offset in offsets)
