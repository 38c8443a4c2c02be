import numpy as np
import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from gptoss_mla_jax.mxfp4 import FOLDABLE_EXPONENT, FP4_VALUES, SCALE_ALIGN, dequantize, pad_scales, quantize


def _bits(a) -> np.ndarray:
    return np.asarray(a).view(np.uint16)


def test_dequantize_bit_exact_with_transformers():
    rng = np.random.default_rng(0)
    # Every byte value in every nibble position, and every scale 0..255.
    blocks = np.tile(np.arange(256, dtype=np.uint8), 2 * 256 * 16 // 256).reshape(2, 256, 1, 16)
    blocks = np.concatenate([blocks, rng.integers(0, 256, (2, 256, 3, 16), dtype=np.uint8)], axis=2)
    scales = np.broadcast_to(np.arange(256, dtype=np.uint8)[None, :, None], (2, 256, 4)).copy()
    ours = np.asarray(dequantize(blocks, scales)).reshape(2, 256, 128)
    want = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales))  # [E, in, out]
    want = want.transpose(1, 2).contiguous().view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(_bits(ours), want)
    # Overflow to inf, subnormals and signed zeros were all exercised.
    bits = _bits(ours)
    assert np.isinf(np.asarray(ours, np.float32)).any()
    assert ((bits & 0x7F80) == 0).any() and (bits == 0x8000).any()


def test_quantize_round_trips_representable_values():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, (3, 7, 64))
    exps = rng.integers(-20, 10, (3, 7, 2))
    values = FP4_VALUES[codes] * np.repeat(np.ldexp(1.0, exps), 32, axis=-1)
    blocks, scales = quantize(values)
    back = np.asarray(dequantize(blocks, scales, np.float32))
    np.testing.assert_array_equal(back, values.astype(np.float32))
    np.testing.assert_array_equal(np.signbit(back), np.signbit(values))  # -0 stays -0
    # Requantizing dequantized weights reproduces the bytes.
    b2, s2 = quantize(back)
    np.testing.assert_array_equal(b2, blocks)
    np.testing.assert_array_equal(s2, scales)


def test_quantize_rounds_to_nearest():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 256)).astype(np.float32)
    blocks, scales = quantize(w)
    back = np.asarray(dequantize(blocks, scales, np.float32))
    step = np.ldexp(1.0, scales.astype(np.int32) - 127).repeat(32, -1)
    assert (np.abs(back).max(-1) >= 4 * step[:, ::32].min(-1)).all()  # the scale uses the top bins
    # No value is closer to another code than to the one chosen (values past 6 saturate to 6).
    grid = FP4_VALUES[None, None, :] * step[..., None]
    best = np.abs(grid - w[..., None]).min(-1)
    np.testing.assert_allclose(np.abs(back - w), best, atol=1e-7)


def test_padded_scale_rows_dequantize_the_same():
    """Scale rows padded to `SCALE_ALIGN` bytes (`pad_scales`, the kernels' aligned layout) give the same
    values; any other width is refused."""
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, (3, 5, 16), dtype=np.uint8)
    scales = rng.integers(110, 140, (3, 5), dtype=np.uint8)
    padded = pad_scales(scales)
    assert padded.shape == (3, SCALE_ALIGN) and not np.asarray(padded)[:, 5:].any()  # exponents past 128
    np.testing.assert_array_equal(_bits(dequantize(blocks, padded)), _bits(dequantize(blocks, scales)))
    with pytest.raises(ValueError, match="do not pair up"):
        dequantize(blocks, np.zeros((3, 8), np.uint8))


@pytest.mark.parametrize("largest, flag", [(FOLDABLE_EXPONENT, 1), (FOLDABLE_EXPONENT + 1, 0)])
def test_padded_rows_flag_whether_every_exponent_of_the_tensor_folds(largest, flag):
    """The first pad byte of every row: 1 when all the tensor's exponents are at most FOLDABLE_EXPONENT
    (the kernels then fold 2^126 into the scales), else 0; the other pad bytes zero. Rows that need no
    padding stay as they are."""
    scales = np.full((2, 3, 90), 120, np.uint8)
    scales[1, 2, 7] = largest
    padded = np.asarray(pad_scales(scales))
    assert padded.shape == (2, 3, 96)
    np.testing.assert_array_equal(padded[..., :90], scales)
    assert (padded[..., 90] == flag).all() and not padded[..., 91:].any()
    assert pad_scales(scales[..., :32]).shape == (2, 3, 32)
