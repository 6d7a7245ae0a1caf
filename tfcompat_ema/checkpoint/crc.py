"""CRC-32C (Castagnoli), as LevelDB tables and TF tensor bundles use it, and its "mask".

Dependency choice: ``google-crc32c`` (a small C extension with SSE4.2/ARM CRC instructions,
no dependencies, several GB/s) when installed, as ``pip install 'tfcompat-ema[checkpoint]'``
does. Without it a numpy fallback computes the same values: thousands of byte lanes stepped
together through a 256-entry table, then joined with the linear "shift by n zero bytes"
map; about 0.1 GB/s (50x slower than the native one), so correct but slow on big
checkpoints.

>>> hex(crc32c(b"123456789"))
'0xe3069283'
>>> unmask(mask(0xe3069283)) == 0xe3069283
True
"""
from __future__ import annotations

import numpy as np

try:                                     # the fast path
    import google_crc32c as _native
except ImportError:                      # the numpy fallback below computes the same values
    _native = None

_POLY = 0x82F63B78                       # CRC-32C, reflected
_MASK_DELTA = 0xA282EAD8


def _make_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> np.uint32(1)) ^ np.uint32(_POLY), table >> np.uint32(1))
    return table.astype(np.uint32)


_TABLE = _make_table()
_TABLE_LIST = [int(x) for x in _TABLE]


def _as_uint8(data) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8) if data.size else np.zeros(0, np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


def crc32c(data, crc: int = 0) -> int:
    """The CRC-32C of ``data`` (bytes, a numpy array or any buffer), extending ``crc``."""
    if _native is not None:
        if not isinstance(data, (bytes, np.ndarray)):
            data = _as_uint8(data)
        elif isinstance(data, np.ndarray) and not data.flags.c_contiguous:
            data = np.ascontiguousarray(data)
        return _native.extend(crc, data)
    return _fallback(_as_uint8(data), crc)


def mask(crc: int) -> int:
    """The masked CRC that tables and bundles store (``crc32c::Mask`` in TF and LevelDB)."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def unmask(masked: int) -> int:
    """The inverse of :func:`mask`."""
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# ---- the fallback ----------------------------------------------------------------------

def _bytes_loop(data: np.ndarray, reg: int) -> int:
    table = _TABLE_LIST
    for byte in data.tobytes():
        reg = table[(reg ^ byte) & 0xFF] ^ (reg >> 8)
    return reg


def _matrix_apply(columns, value: int) -> int:
    out, bit = 0, 0
    while value:
        if value & 1:
            out ^= columns[bit]
        value >>= 1
        bit += 1
    return out


def _matrix_mul(a, b):
    return [_matrix_apply(a, column) for column in b]


def _zeros_matrix(count: int):
    """The linear map on the CRC register of feeding ``count`` zero bytes."""
    one = [_bytes_loop(np.zeros(1, np.uint8), 1 << i) for i in range(32)]
    result = [1 << i for i in range(32)]
    while count:
        if count & 1:
            result = _matrix_mul(one, result)
        one = _matrix_mul(one, one)
        count >>= 1
    return result


def _fallback(data: np.ndarray, crc: int) -> int:
    reg = crc ^ 0xFFFFFFFF
    lanes = min(65536, len(data) // 256)
    if lanes < 16:
        return _bytes_loop(data, reg) ^ 0xFFFFFFFF
    length = len(data) // lanes
    block = np.ascontiguousarray(data[:lanes * length].reshape(lanes, length).T)
    lane_regs = np.zeros(lanes, np.uint32)
    index = np.empty(lanes, np.uint32)
    for column in block:
        np.bitwise_xor(lane_regs, column, out=index)
        np.bitwise_and(index, 0xFF, out=index)
        np.right_shift(lane_regs, 8, out=lane_regs)
        np.bitwise_xor(lane_regs, _TABLE[index], out=lane_regs)
    columns = _zeros_matrix(length)
    tables = [[_matrix_apply(columns, b << (8 * k)) for b in range(256)] for k in range(4)]
    t0, t1, t2, t3 = tables
    for lane_reg in lane_regs.tolist():
        reg = (t0[reg & 0xFF] ^ t1[(reg >> 8) & 0xFF] ^ t2[(reg >> 16) & 0xFF]
               ^ t3[reg >> 24] ^ lane_reg)
    return _bytes_loop(data[lanes * length:], reg) ^ 0xFFFFFFFF
