"""A run's randomness: integer seeds derived from text, and the random streams drawn from them.

Every random number a run's record depends on (the initial centre's A, each member's noise) is drawn
by numpy's counter-based Philox (4x64, keyed by 128 bits of blake2b of a text key), as float64 from
`Generator.standard_normal` / `Generator.random`, then cast to float32. Its output depends on the key
alone: not on the CPU's vector unit and not on the torch build. torch's CPU randn does not qualify:
for one seed, ATEN_CPU_CAPABILITY=default and avx2 differ in 38,569 of 100,003 values (up to 1.9e-6).
The float64 draw absorbs libm: the ziggurat's rare tail samples call log1p, whose last bit could
differ between libm builds, and a float64 that differs in its last bit almost never rounds to
another float32. tests/test_es.py draws under other ATEN_CPU_CAPABILITY, NPY_DISABLE_CPU_FEATURES
and glibc hwcaps settings and gets the same bytes.

NOISE_SCHEME names this scheme; every run records it (ledger `runs.noise_scheme`), and resume and
replay refuse a run recorded under another. numpy guarantees the Philox bit stream, not the
distributions drawn from it (NEP 19), so `check_noise_scheme` compares a known draw with its
recorded hash once per process: a numpy that draws other normals stops with one line instead of
silently rebuilding other members. Change the scheme (a new name) whenever its values change.
"""

from __future__ import annotations

import hashlib

import numpy as np

NOISE_SCHEME = "philox4x64-f64-v1"

# The known answer of NOISE_SCHEME: sha256 of the float32 bytes of standard_normal_f32("es-noise-scheme-check", 100_000)
# (25 of those values come from the ziggurat's tail, which is where libm enters).
_CHECK_KEY, _CHECK_SIZE = "es-noise-scheme-check", 100_000
_CHECK_SHA256 = "a71905072bbba9207f7cb29a9b05ac0eaef35e634f88d423a328b3f171b17b91"
_checked = False
_CHUNK = 1 << 16  # float64 values drawn at a time (the float32 output can be large)


class NoiseSchemeError(RuntimeError):
    """This machine's numpy does not draw NOISE_SCHEME's values: one line."""


def hash_int(text: str) -> int:
    """A 63-bit seed (fits torch.Generator.manual_seed) from a text key."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)


def philox(text: str) -> np.random.Generator:
    """numpy's Philox (4x64) keyed by 128 bits of blake2b(text), counter 0."""
    key = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=16).digest(), "little")
    return np.random.Generator(np.random.Philox(key=key))


def _fill(draw, out: np.ndarray) -> np.ndarray:
    flat = out.reshape(-1)
    buf = np.empty(min(_CHUNK, flat.size), dtype=np.float64)
    for start in range(0, flat.size, _CHUNK):
        n = min(_CHUNK, flat.size - start)
        draw(buf[:n])
        flat[start:start + n] = buf[:n]  # float64 -> float32, round to nearest
    return out


def standard_normal_f32(text: str, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """`size` N(0, 1) values of the stream keyed by `text`, float32 (written into `out` if given: a
    contiguous float32 array of `size` values). Drawn in chunks: the same values as one draw."""
    check_noise_scheme()
    out = np.empty(size, dtype=np.float32) if out is None else out
    if out.dtype != np.float32 or out.size != size or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous float32 array of {size} values")
    gen = philox(text)
    return _fill(lambda buf: gen.standard_normal(out=buf), out)


def uniform_f32(text: str, size: int) -> np.ndarray:
    """`size` U[0, 1) values of the stream keyed by `text` (53-bit float64s), cast to float32."""
    check_noise_scheme()
    gen = philox(text)
    return _fill(lambda buf: gen.random(out=buf), np.empty(size, dtype=np.float32))


def _check_draw() -> str:
    gen = philox(_CHECK_KEY)
    out = np.empty(_CHECK_SIZE, dtype=np.float32)
    return hashlib.sha256(_fill(lambda buf: gen.standard_normal(out=buf), out).tobytes()).hexdigest()


def check_noise_scheme() -> None:
    """Once per process: does this numpy draw NOISE_SCHEME's values? NoiseSchemeError if not."""
    global _checked
    if _checked:
        return
    got = _check_draw()
    if got != _CHECK_SHA256:
        raise NoiseSchemeError(
            f"numpy {np.__version__} draws other normals than noise scheme {NOISE_SCHEME} (known draw hashes to {got[:12]}, "
            f"expected {_CHECK_SHA256[:12]}): runs cannot be rebuilt bit for bit here; use a numpy that matches"
        )
    _checked = True
