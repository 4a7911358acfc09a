"""CLIP tokenization with the ``tokenizers`` library from the bundle's ``tokenizer.json``.

Pads to the model's length with the tokenizer's own pad token (SD1.5: ``<|endoftext|>``; SDXL's second tokenizer
pads with ``!``, id 0) and truncates, keeping BOS/EOS: the same ids as transformers' ``CLIPTokenizer`` with
``padding="max_length", truncation=True``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from lcm_export.runtime.manifest import TokenizerInfo


class PromptTokenizer:
    def __init__(self, bundle_dir: Path, info: TokenizerInfo) -> None:
        from tokenizers import Tokenizer

        self.info = info
        self.tokenizer = Tokenizer.from_file(str(bundle_dir / info.path))
        self.tokenizer.enable_truncation(max_length=info.max_length)
        self.tokenizer.enable_padding(length=info.max_length, pad_id=info.pad_id)

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """Token ids, (len(prompts), max_length) int64. A prompt cut to fit warns, saying what was dropped (as
        diffusers does): the text encoder sees ``max_length`` tokens, start and end tokens included."""
        encodings = self.tokenizer.encode_batch(prompts)
        for prompt, encoding in zip(prompts, encodings, strict=True):
            if encoding.overflowing:
                starts = [start for start, end in encoding.overflowing[0].offsets if end > start]
                cut = starts[0] if starts else len(prompt)
                dropped = prompt[cut:]
                preview = dropped if len(dropped) <= 40 else dropped[:40] + "..."
                warnings.warn(
                    f"a prompt is longer than the text encoder's {self.info.max_length} tokens: its last "
                    f"{len(dropped)} characters are ignored ('{preview}'); shorten the prompt",
                    UserWarning,
                    stacklevel=3,
                )
        return np.array([encoding.ids for encoding in encodings], dtype=np.int64)
