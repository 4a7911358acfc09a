"""The bundle contract's vocabulary: the format's name and version, the enums, the ranges and the patterns.

One place for every fixed value the manifest's readers and cross-checks compare against, so the parts, the checks
and the format-1 upgrade agree on them.
"""

from __future__ import annotations

import re

FORMAT_NAME = "lcm-export-bundle"
FORMAT_VERSION = 2  # 2: per-component artifact variants, declared conditioning, schedules keyed by strength
READABLE_VERSIONS = (1, 2)  # a format-1 manifest is upgraded on read (upgrade_format_1)
MANIFEST_NAME = "manifest.json"
HASH_CHUNK = 8 * 1024 * 1024

# -- the contract's vocabulary ------------------------------------------------------------------------------------

TARGETS = ("onnx", "tensorrt", "coreml", "web")
# target -> the format it runs (a web bundle is an ONNX bundle with the variants browsers want)
TARGET_FORMATS = {"onnx": "onnx", "tensorrt": "tensorrt", "coreml": "mlpackage", "web": "onnx"}
# The JavaScript runtime's backends (js/src/backends.js), the keys of the manifest's optional "backend_variants":
# the precision `auto` runs on each (bundle-format.md, "Choosing a variant", rule 3).
BROWSER_BACKENDS = ("node", "wasm", "webgpu")
ARTIFACT_SUFFIXES = {"onnx": ".onnx", "tensorrt": ".plan", "mlpackage": ".mlpackage"}
FOLDER_FORMATS = ("mlpackage",)  # artifacts that are folders: every file inside must be listed in ``files``
PRECISIONS = ("fp32", "fp16", "int8")  # what a variant stores (int8: quantised weights and activations)
EXPORT_PRECISIONS = ("fp32", "fp16", "int8")  # what an export may be asked for (manifest "precision")
# The float I/O dtype a variant of each precision takes by default (quantised graphs keep float32 I/O).
PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "float32"}
VARIANT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # e.g. fp32, fp16, int8-qdq
# Where the U-Net's conditioning inputs come from (runtime/conditioning.py builds each):
CONDITIONING_SOURCES = ("text_hidden_states", "pooled_text", "guidance_embedding", "size_ids")
EMPTY_NEGATIVE_MODES = ("encode", "zeros")  # SD encodes "", SDXL zeroes it (force_zeros_for_empty_prompt)
FLOAT_DTYPES = ("float32", "float16")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
GUIDANCE_MODES = ("embedding", "cfg")
# What a call without guidance_scale uses: diffusers' LatentConsistencyModelPipeline default for the w-embedding;
# 1.0 (no unconditional pass) for LCM-LoRA with classifier-free guidance, whose documented range is 1-2.
DEFAULT_GUIDANCE_SCALE = {"embedding": 8.5, "cfg": 1.0}
MAX_GUIDANCE_SCALE = 50.0
VAE_KINDS = ("autoencoder_kl", "autoencoder_tiny")
# The (text encoder, tokenizer) pairs of each model family, in the order their hidden states are concatenated:
# SD 1.x/2.x one CLIP, SDXL (and SSD-1B) CLIP-L then OpenCLIP-bigG.
FAMILY_TEXT_ENCODERS = {
    "sd": (("text_encoder", "tokenizer"),),
    "sdxl": (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")),
}
FAMILIES = tuple(FAMILY_TEXT_ENCODERS)
RUNTIME_COMPONENTS = ("text_encoder", "unet", "vae_decoder")  # what Pipeline runs (and the declared encoders)
COMPONENT_NAMES = (*RUNTIME_COMPONENTS, "text_encoder_2", "vae_encoder")
TOKENIZER_FILE = "tokenizer.json"  # the ``tokenizers`` library's format

# Ranges: generous bounds on what real models have, tight enough that no value overflows the runtime.
MAX_IMAGE_SIDE = 16384
MAX_VAE_SCALE_FACTOR = 64
MAX_CHANNELS = 65536
MAX_SEQUENCE = 8192
MAX_TOKEN_ID = 2**31 - 1
MAX_TRAIN_TIMESTEPS = 100_000
MAX_SCHEDULES = 1000  # step counts with a table (the exporter's --max-steps limit)
MAX_VAE_FACTOR = 100.0  # |vae_scaling_factor| and |vae_shift_factor|: SD 0.18215, SDXL 0.13025, SD3 1.5305
MAX_SCHEDULER_VALUE = 1e4  # init_noise_sigma, clip_sample_range, sample_max_value
TABLE_TOLERANCE = 1e-5  # the identities hold to float32 rounding (~3e-7)

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
COMPONENT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
WINDOWS_DRIVE = re.compile(r"[A-Za-z]:")
STEP_COUNT = re.compile(r"[1-9][0-9]{0,3}")  # a table key: "1" .. "1000"
# A partial-strength (img2img) table key: "4@0.5" is 4 steps at strength 0.5.
STRENGTH_KEY = re.compile(r"([1-9][0-9]{0,3})@(0\.[0-9]{1,6})")
