"""lcm-export: compile Latent Consistency Models into self-describing bundles for edge runtimes.

The package is split so that dependencies point one way:

* :mod:`lcm_export.runtime` -- numpy + ``tokenizers`` + one backend; never torch.
* :mod:`lcm_export.targets` / :mod:`lcm_export.calibration` -- turn ONNX into device artifacts.
* :mod:`lcm_export.exporter` -- the torch/diffusers side that writes bundles.
"""

from __future__ import annotations

__version__ = "0.1.0"
