"""The prompts INT8 calibration runs by default, and a held-out set the quality report also measures.

Varied on purpose (subjects, styles, lighting, lengths, a negative-sounding one, an empty one): activation ranges
come from the trajectories these prompts produce, so a narrow set would clip what other prompts need. The held-out
prompts are never used to calibrate; the report gives image quality on both.
"""

from __future__ import annotations

CALIBRATION_PROMPTS: tuple[str, ...] = (
    "a photo of a cat sitting on a windowsill, soft morning light",
    "an astronaut riding a horse on the moon, digital art",
    "a bowl of ramen with chopsticks, close-up food photography",
    "a watercolor painting of a lighthouse at dusk",
    "portrait of an old fisherman, dramatic lighting, 85mm",
    "a futuristic city skyline at night with neon signs, cyberpunk",
    "a red sports car on a mountain road, motion blur",
    "an oil painting of sunflowers in a vase, impressionist",
    "a cozy living room with a fireplace and bookshelves, interior design",
    "a dragon made of crystal flying over a snowy forest, fantasy art",
    "pixel art of a small village with a windmill",
    "a macro photo of a dew drop on a green leaf",
    "a black and white street photo of a rainy crosswalk",
    "a cute corgi puppy wearing sunglasses, studio photo",
    "abstract geometric shapes in bright primary colors",
    "",
)

HELD_OUT_PROMPTS: tuple[str, ...] = (
    "a medieval castle on a cliff above the sea, golden hour",
    "a plate of sushi on a wooden table, top view",
    "a pencil sketch of a girl reading a book",
    "a tropical beach with palm trees and turquoise water",
    "a robot barista making coffee in a small cafe, 3d render",
    "autumn forest path covered in orange leaves, fog",
)
