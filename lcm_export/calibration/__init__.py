"""INT8 calibration on real 4-step LCM trajectories, and the quantisation recipes per target.

``trajectories`` records the U-Net's inputs as the float bundle's own loop runs them (the runtime's step observer),
``onnx_qdq`` writes a QDQ INT8 ONNX from them (onnxruntime, OpenVINO and TensorRT all read it), ``quality``
measures PSNR/SSIM of the final images, ``int8`` ties them together for the exporter, and ``prompts`` holds the
default calibration and held-out prompt sets. Imports the runtime only, never the exporter.
"""
