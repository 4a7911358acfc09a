"""The shared generator (lcm_export/runtime/philox.py): Random123's known answers, determinism, the counter layout,
and the moments of its standard normals."""

from __future__ import annotations

import numpy as np
import pytest

from lcm_export.errors import UserError
from lcm_export.runtime.draws import image_to_image_draws, text_to_image_draws
from lcm_export.runtime.philox import PhiloxGenerator, philox4x32, standard_normal

# Random123 kat_vectors, philox4x32 with 10 rounds: (counter, key, expected output).
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize(("counter", "key", "expected"), KNOWN_ANSWERS)
def test_philox4x32_10_gives_random123_known_answers(counter, key, expected) -> None:
    words = philox4x32(tuple(np.array([c], dtype=np.uint64) for c in counter), key)
    assert tuple(int(word[0]) for word in words) == expected


def test_block_j_of_tensor_k_is_philox_of_its_counter() -> None:
    seed = (0x12345678 << 32) | 0x9ABCDEF0
    tensor = standard_normal(seed, 3, (2, 5))  # 10 elements: blocks 0, 1 and half of 2
    words = philox4x32(tuple(np.array([c], dtype=np.uint64) for c in (2, 3, 0, 0)), (0x9ABCDEF0, 0x12345678))
    u1 = (float(words[0][0]) + 1) / 2**32
    u2 = float(words[1][0]) / 2**32
    radius = np.sqrt(-2 * np.log(u1))
    assert tensor.reshape(-1)[8] == np.float32(radius * np.cos(2 * np.pi * u2))
    assert tensor.reshape(-1)[9] == np.float32(radius * np.sin(2 * np.pi * u2))


def test_draws_are_deterministic_and_differ_by_seed_and_index() -> None:
    first = standard_normal(0, 0, (1, 4, 8, 8))
    assert first.dtype == np.float32 and first.shape == (1, 4, 8, 8)
    assert np.array_equal(first, standard_normal(0, 0, (1, 4, 8, 8)))
    assert not np.array_equal(first, standard_normal(1, 0, (1, 4, 8, 8)))
    assert not np.array_equal(first, standard_normal(0, 1, (1, 4, 8, 8)))
    assert not np.array_equal(first, standard_normal(2**32, 0, (1, 4, 8, 8)))  # the key's high word counts
    standard_normal(2**64 - 1, 0, (4,))
    for bad in (-1, 2**64, 1.5, True, "3"):
        with pytest.raises(UserError, match="seed"):
            standard_normal(bad, 0, (4,))


def test_a_prefix_of_a_tensor_is_the_smaller_tensor() -> None:
    """Row-major blocks: a tensor of n elements is the first n of any larger one with the same (seed, k)."""
    large = standard_normal(5, 2, (1001,))
    assert np.array_equal(standard_normal(5, 2, (7,)), large[:7])
    assert np.array_equal(standard_normal(5, 2, (2, 3, 4)).reshape(-1), large[:24])


def test_tensor_k_does_not_depend_on_the_size_of_tensor_k_minus_1() -> None:
    small, large = PhiloxGenerator(9), PhiloxGenerator(9)
    small.standard_normal((1, 4, 2, 2))
    large.standard_normal((2, 4, 64, 64))
    assert np.array_equal(small.standard_normal((1, 4, 8, 8)), large.standard_normal((1, 4, 8, 8)))


def test_a_million_draws_are_standard_normal() -> None:
    values = standard_normal(123, 0, (1_000_000,)).astype(np.float64)
    assert np.isfinite(values).all()
    assert abs(values.mean()) < 5e-3  # std error 1e-3
    assert abs(values.std() - 1.0) < 5e-3
    assert abs(np.mean(values > 0) - 0.5) < 3e-3
    assert abs(np.mean(np.abs(values) < 1.0) - 0.6827) < 3e-3


def test_passed_tensors_keep_the_other_draws_indices() -> None:
    shape = (1, 4, 4, 4)
    drawn = text_to_image_draws(4, shape, 3)
    assert np.array_equal(drawn.latents, standard_normal(4, 0, shape))
    assert [np.array_equal(n, standard_normal(4, k + 1, shape)) for k, n in enumerate(drawn.noise)] == [True, True]
    given = text_to_image_draws(4, shape, 3, latents=np.zeros(shape, np.float32))
    assert all(np.array_equal(a, b) for a, b in zip(given.noise, drawn.noise, strict=True))
    kl = image_to_image_draws(4, shape, 2, tiny_vae=False)
    tiny = image_to_image_draws(4, shape, 2, tiny_vae=True)
    assert np.array_equal(kl.sample_noise, standard_normal(4, 0, shape))
    assert np.array_equal(kl.image_noise, standard_normal(4, 1, shape))
    assert np.array_equal(tiny.image_noise, standard_normal(4, 0, shape))  # no latent-sample draw
    assert np.array_equal(tiny.noise[0], standard_normal(4, 1, shape))
