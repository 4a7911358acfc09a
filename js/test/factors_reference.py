"""The Python runtime's adapter_mode "factors" for js/test/adapters.test.js (which runs it: factors_reference.py SPEC).

SPEC is JSON: {"out": folder, "cases": [{"name", "bundle", "adapter", "second", "weight", "second_weight", "seed",
"steps"}]}. Per case, into ``out``: the image with the adapter at ``weight`` in factors mode (onnxruntime, the
case's variant), and every factor input ``factor_inputs`` gives for the adapter at ``weight`` plus ``second`` (a copy
of it) at ``second_weight`` (stacked factors), as raw little-endian bytes; ``factor_shares`` of the adapter alone; and
per component its factor-inputs graph cut as the Python runtime cuts it for the adapter alone (cut_factor_branches of
the weights it leaves: the bytes onnxruntime opens), and cut of every branch. Prints the index as JSON on its last
line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from lcm_export.runtime import Pipeline
from lcm_export.runtime.adapters import factor_inputs, factor_shares
from lcm_export.runtime.backends.onnxruntime import factor_signature
from lcm_export.runtime.factor_graph import cut_factor_branches


def main() -> None:
    spec = json.loads(sys.argv[1])
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    index: dict = {}
    for case in spec["cases"]:
        name = case["name"]
        pipe = Pipeline.load(case["bundle"], backend="onnxruntime", precision="fp32", variant=name,
                             adapter_mode="factors")  # fmt: skip
        pipe.set_adapters({case["adapter"]: case["weight"]})
        image = np.ascontiguousarray(
            pipe("a cat", num_inference_steps=case["steps"], seed=case["seed"]).images, dtype=np.float32
        )
        (out / f"{name}-image.f32").write_bytes(image.tobytes())
        state = pipe.adapter_state
        entry = {"image": {"file": f"{name}-image.f32", "shape": list(image.shape)}, "modes": dict(state.modes)}
        first, second = state._load(case["adapter"]), state._load(case["second"])
        entry["shares"], entry["inputs"], entry["cuts"] = {}, {}, {}
        for component, weight_map in sorted(state.weight_maps.items()):
            variant = pipe.denoiser.variants[component].name
            entry["shares"][component] = factor_shares(weight_map, [(first, case["weight"])])
            values = factor_inputs(weight_map, variant, [(first, case["weight"]), (second, case["second_weight"])])
            tensors = {}
            for key, value in sorted(values.items()):
                file = f"{name}-{component}-{len(tensors)}.bin"
                (out / file).write_bytes(np.ascontiguousarray(value).tobytes())
                tensors[key] = {"file": file, "dtype": str(value.dtype), "shape": list(value.shape)}
            entry["inputs"][component] = tensors
            alone = factor_inputs(weight_map, variant, [(first, case["weight"])])
            shapes = {key: value.shape for key, value in alone.items()}
            kept = factor_signature(shapes)
            every = sorted({key.rsplit(".", 1)[0] for key in shapes})
            graph = Path(case["bundle"]) / weight_map.variants[variant]["factor_inputs_graph"]
            cuts = {}
            for label, cut in (("adapter", sorted(set(every) - set(kept))), ("every", every)):
                file = f"{name}-{component}-cut-{label}.onnx"
                (out / file).write_bytes(cut_factor_branches(graph.read_bytes(), set(cut)))
                cuts[label] = {"file": file, "cut": cut}
            entry["cuts"][component] = {"graph": str(graph), "kept": list(kept), **cuts}
        index[name] = entry
    print(json.dumps(index))


if __name__ == "__main__":
    main()
