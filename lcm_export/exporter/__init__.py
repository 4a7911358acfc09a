"""The exporter: the torch/diffusers side that turns a pipeline into a bundle.

It loads a diffusers pipeline (fusing LoRAs), declares each component as a spec plus a torch module
(``components``), exports each to ONNX and checks it against PyTorch at other shapes (``onnx_export``), computes
the LCM tables with diffusers' own scheduler (``schedule``), hands the checked files to the chosen target through
the target registry (:mod:`lcm_export.targets`) and writes the bundle atomically (``bundle``). Nothing outside
this package imports it: the runtime, the targets and the calibration stand on their own.
"""
