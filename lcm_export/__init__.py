"""lcm-export: compile Latent Consistency Models into self-describing bundles for edge runtimes.

The package is split so that dependencies point one way:

* :mod:`lcm_export.runtime` -- numpy + ``tokenizers`` + one backend; never torch.
* :mod:`lcm_export.targets` / :mod:`lcm_export.calibration` -- turn ONNX into device artifacts.
* :mod:`lcm_export.exporter` -- the torch/diffusers side that writes bundles.
"""

from __future__ import annotations

__version__ = "0.1.0"

# The distribution's name on the package registry. "lcm-export" there is an unrelated 2019 project (an LCM
# log-file exporter) that also ships an ``lcm_export`` module and an ``lcm-export`` command; the commands and the
# import package keep their names, the distribution takes a free one. Install hints are built from this.
DISTRIBUTION = "lcm-edge"
