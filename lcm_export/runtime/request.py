"""One generation call's arguments, checked before anything runs (text-to-image, image-to-image and the frame loop
build the same :class:`GenerationRequest`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lcm_export.runtime.inputs import (
    check_guidance,
    check_integer,
    check_negative_prompt,
    check_prompts,
    check_seed,
    check_strength,
)
from lcm_export.runtime.manifest import PipelineInfo, StepTable
from lcm_export.runtime.scheduler import LCMScheduler


@dataclass(frozen=True)
class GenerationRequest:
    """A call's checked arguments and the step table they select."""

    prompts: list[str]
    negatives: list[str]  # the unconditional prompts of a CFG call ("" each when none was given)
    negative_given: bool
    images_per_prompt: int
    guidance_scale: float
    table: StepTable
    seed: int | None
    use_cfg: bool  # classifier-free guidance: a CFG bundle at guidance > 1 runs [unconditional, conditional]

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.images_per_prompt

    @property
    def steps(self) -> int:
        return len(self.table.timesteps)

    @classmethod
    def build(
        cls,
        info: PipelineInfo,
        scheduler: LCMScheduler,
        prompt: Any,
        *,
        negative_prompt: Any = None,
        num_inference_steps: Any = 4,
        guidance_scale: Any = None,
        num_images_per_prompt: Any = 1,
        seed: Any = None,
        strength: Any = None,  # None: text-to-image (the full schedule)
    ) -> GenerationRequest:
        """Check every argument (one-line errors naming the argument) and look up the step table."""
        prompts = check_prompts(prompt)
        images = check_integer("num_images_per_prompt", num_images_per_prompt, minimum=1)
        steps = check_integer("num_inference_steps", num_inference_steps, minimum=1)
        guidance = check_guidance(info.default_guidance_scale if guidance_scale is None else guidance_scale)
        checked_seed = check_seed(seed)
        table = scheduler.table(steps, 1.0 if strength is None else check_strength(strength))
        negatives = check_negative_prompt(
            negative_prompt, len(prompts), guidance_kind=info.guidance, guidance_scale=guidance
        )
        use_cfg = info.guidance == "cfg" and guidance > 1.0
        return cls(prompts, negatives, negative_prompt is not None, images, guidance, table, checked_seed, use_cfg)
