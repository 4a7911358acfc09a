"""The U-Net's conditioning, built from the manifest's declaration (``Manifest.conditioning``), not per family.

A model family is a set of sources: SD 1.x feeds one CLIP encoder's last hidden state (and, distilled, the LCM
w-embedding); SDXL concatenates two encoders' penultimate states and adds the second's pooled embedding and the
size ids. The loop asks this module for the feeds of a call; each source is one small builder here, so a new
family that reuses them is a manifest, not new loop code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lcm_export.runtime.manifest import Conditioning, PipelineInfo
from lcm_export.runtime.scheduler import guidance_scale_embedding

# SDXL's micro-conditioning (the U-Net's time_ids, "size_ids" here): original size (2), crop top-left (2), target
# size (2). The refiner's U-Net takes 5 instead (original size, crop, aesthetic score).
SDXL_SIZE_IDS = 6


@dataclass(frozen=True)
class TextConditioning:
    """The text encoders' outputs for a list of prompts: hidden states of every encoder concatenated on the last
    axis, (B, S, D), and the pooled embedding of the last encoder that declares one, (B, P), or None."""

    hidden: np.ndarray
    pooled: np.ndarray | None

    @classmethod
    def concatenate(cls, parts: list[TextConditioning]) -> TextConditioning:
        """Stack the batches of several encodings (e.g. [unconditional, conditional])."""
        pooled = [part.pooled for part in parts]
        return cls(
            np.concatenate([part.hidden for part in parts]),
            None if any(p is None for p in pooled) else np.concatenate(pooled),
        )

    def repeat(self, count: int) -> TextConditioning:
        """Each prompt's rows ``count`` times in a row (images per prompt)."""
        return TextConditioning(
            np.repeat(self.hidden, count, axis=0),
            None if self.pooled is None else np.repeat(self.pooled, count, axis=0),
        )

    def zeros_like(self) -> TextConditioning:
        return TextConditioning(np.zeros_like(self.hidden), None if self.pooled is None else np.zeros_like(self.pooled))


def unet_conditioning_feeds(
    conditioning: Conditioning,
    pipeline: PipelineInfo,
    text: TextConditioning,
    *,
    guidance_scale: float,
    images: int,
    height: int,
    width: int,
) -> dict[str, np.ndarray]:
    """Every U-Net input but ``sample`` and ``timestep``, for a batch of ``images`` (twice that with CFG, the
    unconditional half first, as ``text`` already is)."""
    batch = text.hidden.shape[0]
    per_image = batch // images  # 2 with CFG, else 1
    sources: dict[str, np.ndarray] = {}
    for name, source in conditioning.unet_inputs.items():
        if source == "text_hidden_states":
            sources[name] = text.hidden
        elif source == "pooled_text":
            sources[name] = text.pooled  # validated: some encoder declares it
        elif source == "guidance_embedding":
            sources[name] = guidance_scale_embedding(
                guidance_scale, int(pipeline.time_cond_proj_dim), batch, conditioning.guidance_frequencies
            )
        else:  # "size_ids": original size, crop top-left, target size (SDXL's micro-conditioning)
            ids = np.array([height, width, 0, 0, height, width], dtype=np.float32)
            sources[name] = np.broadcast_to(ids, (images * per_image, ids.size))
    return sources
