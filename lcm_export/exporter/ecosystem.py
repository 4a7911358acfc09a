"""The bundle's files for other loaders: a tokenizer folder that transformers 4.x and 5.x both open.

Our runtime reads only ``tokenizer/tokenizer.json`` (the ``tokenizers`` library). diffusers and optimum-onnx's ORT
pipelines instead build each tokenizer with the class that ``model_index.json`` names, from the folder's files:
transformers 5 saves ``tokenizer.json`` only, while transformers 4.x's slow ``CLIPTokenizer`` needs ``vocab.json``
and ``merges.txt``. So the folder gets both (the BPE files are derived from ``tokenizer.json``'s own model, so the
two describe one vocabulary), a ``tokenizer_config.json`` without the exporting machine's loading state, and
``model_index.json`` names ``CLIPTokenizerFast``: transformers 4.x then loads ``tokenizer.json`` (the same ids as our
runtime, where the slow class's text clean-up can differ on unusual text) and transformers 5 treats the name as an
alias of its ``CLIPTokenizer``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lcm_export.errors import ExportError

# What model_index.json names for the tokenizer: loadable from tokenizer.json by transformers 4.x and 5.x.
TOKENIZER_LIBRARY_CLASS = ("transformers", "CLIPTokenizerFast")
# Keys transformers 5 writes into tokenizer_config.json that describe how it was loaded, not the tokenizer.
_LOADING_STATE_KEYS = ("backend", "is_local", "local_files_only", "name_or_path")


def write_tokenizer(tokenizer: Any, directory: Path) -> None:
    """Save ``tokenizer`` into ``directory`` as tokenizer.json, vocab.json, merges.txt and tokenizer_config.json."""
    tokenizer.save_pretrained(str(directory))
    tokenizer_json = directory / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise ExportError("the tokenizer could not be saved as tokenizer.json (a fast CLIP tokenizer is required)")
    _write_bpe_files(tokenizer_json, directory)
    _write_portable_config(directory / "tokenizer_config.json", tokenizer_json)


def _write_bpe_files(tokenizer_json: Path, directory: Path) -> None:
    """``vocab.json`` + ``merges.txt`` of the BPE model in ``tokenizer.json``, written by ``tokenizers`` itself."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    model = Tokenizer.from_file(str(tokenizer_json)).model
    if not isinstance(model, BPE):
        raise ExportError(
            f"the tokenizer is a {type(model).__name__} model, not BPE: a CLIP tokenizer is required "
            "(its vocab.json and merges.txt are written for transformers 4.x)"
        )
    written = {Path(path).name for path in model.save(str(directory))}
    if written != {"vocab.json", "merges.txt"}:
        raise ExportError(f"the tokenizer's BPE model was saved as {sorted(written)}, not vocab.json + merges.txt")


def _write_portable_config(config_path: Path, tokenizer_json: Path) -> None:
    """Rewrite ``tokenizer_config.json`` so both transformers 4.x and 5.x read it the same way.

    The exporting machine's loading state is dropped, and the special tokens' ids are listed the way transformers
    4.x saves them (``added_tokens_decoder``), taken from ``tokenizer.json``.
    """
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in _LOADING_STATE_KEYS:
        config.pop(key, None)
    if "model_max_length" not in config:
        raise ExportError("the tokenizer has no model_max_length: the padded prompt length is unknown")
    added_tokens = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("added_tokens") or []
    config.setdefault(
        "added_tokens_decoder",
        {
            str(token["id"]): {key: token[key] for key in sorted(token) if key != "id"}
            for token in sorted(added_tokens, key=lambda token: token["id"])
        },
    )
    config_path.write_text(json.dumps(dict(sorted(config.items())), indent=2, ensure_ascii=False) + "\n")
