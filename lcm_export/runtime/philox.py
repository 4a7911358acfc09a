"""The shared seeded generator: counter-based Philox4x32-10 and the Box–Muller transform, in numpy.

Every lcm-export runtime (this one, the JavaScript one) draws the same standard-normal tensors from the same seed
with it (``docs/bundle-format.md``, "The shared generator"). Counter-based: element block j of the call's k-th
tensor is a pure function of (seed, k, j), so a tensor does not depend on the sizes of the tensors drawn before it,
and any runtime can fill a tensor in any order. numpy's own generators are not specified across languages.

- key = (seed mod 2^32, seed div 2^32) for a seed in [0, 2^64);
- the block j of tensor k (elements 4j .. 4j+3, row-major) is Philox4x32-10 of the counter
  (j mod 2^32, k, j div 2^32, 0) under that key: four 32-bit words x0..x3;
- Box–Muller in float64 on the pairs (x0, x1) and (x2, x3): u1 = (x_a + 1) / 2^32 in (0, 1], u2 = x_b / 2^32,
  r = sqrt(-2 ln u1), z_a = r cos(2π u2), z_b = r sin(2π u2); then float32. A tail of fewer than 4 elements uses
  the first words of its block.
"""

from __future__ import annotations

import numpy as np

from lcm_export.errors import UserError

MASK32 = np.uint64(0xFFFFFFFF)
MULTIPLIERS = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
WEYL = (np.uint64(0x9E3779B9), np.uint64(0xBB67AE85))
ROUNDS = 10
SEED_LIMIT = 2**64
TWO_POW_32 = 4294967296.0


def philox4x32(counter: tuple[np.ndarray, ...], key: tuple[int, int], rounds: int = ROUNDS) -> tuple[np.ndarray, ...]:
    """Random123's ``philox4x32_R(rounds, counter, key)``, vectorised: each of the four counter words is an array of
    uint32 values (held in uint64); returns the four output words the same way (uint64 arrays below 2^32)."""
    c0, c1, c2, c3 = (np.asarray(word, dtype=np.uint64) & MASK32 for word in counter)
    k0, k1 = np.uint64(key[0] & 0xFFFFFFFF), np.uint64(key[1] & 0xFFFFFFFF)
    for round_index in range(rounds):
        if round_index > 0:  # the key is bumped before rounds 2..R
            k0 = (k0 + WEYL[0]) & MASK32
            k1 = (k1 + WEYL[1]) & MASK32
        product0 = MULTIPLIERS[0] * c0  # exact: both factors < 2^32
        product1 = MULTIPLIERS[1] * c2
        hi0, lo0 = product0 >> np.uint64(32), product0 & MASK32
        hi1, lo1 = product1 >> np.uint64(32), product1 & MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def check_generator_seed(seed: object) -> int:
    """A seed in [0, 2^64) as an int; anything else is a :class:`UserError`."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < SEED_LIMIT:
        raise UserError(f"seed={seed!r}: pass an integer in [0, 2**64)")
    return int(seed)


def standard_normal(seed: int, tensor_index: int, shape: tuple[int, ...]) -> np.ndarray:
    """Tensor ``tensor_index`` (0-based, in the call's draw order) of ``seed``: float32 standard normal, ``shape``."""
    seed = check_generator_seed(seed)
    size = int(np.prod(shape, dtype=np.int64))
    blocks = (size + 3) // 4
    block = np.arange(blocks, dtype=np.uint64)  # j
    counter = (
        block & MASK32,
        np.full(blocks, tensor_index, dtype=np.uint64),
        block >> np.uint64(32),
        np.zeros_like(block),
    )
    x0, x1, x2, x3 = philox4x32(counter, (seed & 0xFFFFFFFF, seed >> 32))
    values = np.empty((blocks, 4), dtype=np.float64)
    for column, (a, b) in enumerate(((x0, x1), (x2, x3))):
        u1 = (a.astype(np.float64) + 1.0) / TWO_POW_32  # (0, 1]: the log stays finite
        u2 = b.astype(np.float64) / TWO_POW_32  # [0, 1)
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = 2.0 * np.pi * u2
        values[:, 2 * column] = radius * np.cos(angle)
        values[:, 2 * column + 1] = radius * np.sin(angle)
    return values.reshape(-1)[:size].astype(np.float32).reshape(shape)


class PhiloxGenerator:
    """The draws of one call: each :meth:`standard_normal` is the next tensor index of ``seed``."""

    def __init__(self, seed: int) -> None:
        self.seed = check_generator_seed(seed)
        self.tensor_index = 0

    def standard_normal(self, shape: tuple[int, ...]) -> np.ndarray:
        tensor = standard_normal(self.seed, self.tensor_index, shape)
        self.tensor_index += 1
        return tensor

    def skip(self) -> None:
        """Count a tensor the caller passed, so the following draws keep their indices."""
        self.tensor_index += 1
