"""CLIP tokenization with the ``tokenizers`` library from the bundle's ``tokenizer.json``.

Pads to the model's length with the tokenizer's own pad token (SD1.5: ``<|endoftext|>``; SDXL's second tokenizer
pads with ``!``, id 0) and truncates, keeping BOS/EOS: the same ids as transformers' ``CLIPTokenizer`` with
``padding="max_length", truncation=True``.
"""

from __future__ import annotations

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
        """Token ids, (len(prompts), max_length) int64."""
        return np.array([encoding.ids for encoding in self.tokenizer.encode_batch(prompts)], dtype=np.int64)
