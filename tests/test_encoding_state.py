"""The compiled float16 rounding of the carried LSTM state gives numpy's bits (encoding.carried_state)."""
import numpy as np

from seqguard.encoding import _carried_state_numpy, carried_state


def _same(x: np.ndarray) -> None:
    x = x[~np.isnan(x)]
    a, b = carried_state(x), _carried_state_numpy(x)
    bad = np.flatnonzero(a.view(np.uint32) != b.view(np.uint32))
    assert not len(bad), (x[bad[:5]], a[bad[:5]], b[bad[:5]])


def test_carried_state_equals_numpy_bit_for_bit():
    rng = np.random.default_rng(0)
    _same(rng.integers(0, 2**32, size=2_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32))
    # every float32 around the subnormal / normal float16 boundary and at the top of its range
    for lo, hi in ((2.0**-16, 2.0**-13), (2.0**14, 2.0**17)):
        v = np.arange(np.float32(lo).view(np.uint32), np.float32(hi).view(np.uint32), dtype=np.uint32).view(np.float32)
        _same(v)
        _same(-v)
    edges = np.array([0.0, np.inf, 65504, 65505, 65519.99, 65520, 65536, 1e30, 2**-14, 2**-24, 2**-25, 3 * 2**-26,
                      1.4e-45, 1.17e-38, 1.0009765625, 1.00048828125, 1.00146484375], np.float32)
    _same(edges)
    _same(-edges)
    x = (rng.normal(size=(7, 64)) * 100).astype(np.float32)
    assert carried_state(x).shape == x.shape
    assert np.array_equal(carried_state(x[:, ::2]), _carried_state_numpy(x[:, ::2]))   # not contiguous
    assert np.array_equal(carried_state(x.astype(np.float64)), _carried_state_numpy(x.astype(np.float64)))
    n = carried_state(np.array([[1.0, np.nan]], np.float32))                # NaN: numpy's way
    assert n[0, 0] == 1.0 and np.isnan(n[0, 1])
