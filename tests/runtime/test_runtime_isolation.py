"""The runtime runs a bundle in a process where importing torch, diffusers or transformers fails."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "diffusers", "transformers", "optimum", "peft"}:
                raise ImportError(f"blocked: {name}")
            return None

    sys.meta_path.insert(0, Block())
    """
)


def test_runtime_without_torch(tiny_lcm_bundle, tmp_path) -> None:
    script = BLOCKER + textwrap.dedent(
        f"""
        import json, sys
        try:
            import torch
            raise SystemExit("torch was importable")
        except ImportError:
            pass
        from lcm_export.runtime import Pipeline
        from lcm_export.runtime.cli import main
        pipe = Pipeline.load({str(tiny_lcm_bundle)!r}, backend="onnxruntime")
        out = pipe("a cat", seed=0)
        assert main([{str(tiny_lcm_bundle)!r}, "a cat", "--output", {str(tmp_path / "cat.png")!r},
                     "--backend", "onnxruntime", "--quiet"]) == 0
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {{"torch", "diffusers", "transformers"}})
        print(json.dumps({{"shape": list(out.images.shape), "mean": float(out.images.mean()), "heavy": heavy}}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["shape"] == [1, 32, 32, 3]
    assert 0.0 < report["mean"] < 1.0
    assert report["heavy"] == []
    assert (tmp_path / "cat.png").stat().st_size > 100


def test_runtime_package_imports_nothing_heavy() -> None:
    script = "import sys, lcm_export.runtime, lcm_export.runtime.cli; " + (
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch','diffusers','transformers','onnx','lcm_export.exporter'} or m.startswith('lcm_export.exporter')))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
