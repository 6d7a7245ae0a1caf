"""TF's ``DataType`` numbers and how each is stored, held and named.

A value is held in numpy as its *storage* dtype: bfloat16 and the float8/float4 types as the
unsigned integers of their width (bit patterns, no ml_dtypes needed), int4/int2 as int8 and
uint4/uint2 as uint8 (TF stores one element a byte, in the low bits).

>>> DTYPES[14].name, DTYPES[14].storage
('bfloat16', dtype('uint16'))
>>> tf_dtype_of(np.dtype("float32"))
1
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

STRING, RESOURCE, VARIANT = 7, 20, 21


@dataclass(frozen=True)
class DType:
    number: int
    name: str
    storage: Optional[np.dtype]        # None: not a fixed-size numeric type
    bits: int = 0                      # 2 or 4: a sub-byte integer, one element a byte


def _d(number, name, storage, bits=0):
    return DType(number, name, None if storage is None else np.dtype(storage), bits)


DTYPES = {d.number: d for d in [
    _d(1, "float32", "f4"), _d(2, "float64", "f8"), _d(3, "int32", "i4"), _d(4, "uint8", "u1"),
    _d(5, "int16", "i2"), _d(6, "int8", "i1"), _d(7, "string", None),
    _d(8, "complex64", "c8"), _d(9, "int64", "i8"), _d(10, "bool", "?"),
    _d(11, "qint8", "i1"), _d(12, "quint8", "u1"), _d(13, "qint32", "i4"),
    _d(14, "bfloat16", "u2"), _d(15, "qint16", "i2"), _d(16, "quint16", "u2"),
    _d(17, "uint16", "u2"), _d(18, "complex128", "c16"), _d(19, "float16", "f2"),
    _d(20, "resource", None), _d(21, "variant", None), _d(22, "uint32", "u4"),
    _d(23, "uint64", "u8"), _d(24, "float8_e5m2", "u1"), _d(25, "float8_e4m3fn", "u1"),
    _d(26, "float8_e4m3fnuz", "u1"), _d(27, "float8_e4m3b11fnuz", "u1"),
    _d(28, "float8_e5m2fnuz", "u1"), _d(29, "int4", "i1", 4), _d(30, "uint4", "u1", 4),
    _d(31, "int2", "i1", 2), _d(32, "uint2", "u1", 2), _d(33, "float4_e2m1fn", "u1"),
]}
BY_NAME = {d.name: d.number for d in DTYPES.values()}
_PLAIN = {"f4": 1, "f8": 2, "i4": 3, "u1": 4, "i2": 5, "i1": 6, "c8": 8, "i8": 9, "b1": 10,
          "u2": 17, "c16": 18, "f2": 19, "u4": 22, "u8": 23}


def tf_dtype_of(dtype: np.dtype) -> int:
    """The TF DataType number of a numpy dtype (ml_dtypes' types by their names)."""
    dtype = np.dtype(dtype)
    if dtype.name in BY_NAME:        # numpy's names and ml_dtypes' (bfloat16, float8_*, int4)
        return BY_NAME[dtype.name]
    code = dtype.kind + str(dtype.itemsize)
    if code in _PLAIN:
        return _PLAIN[code]
    raise TypeError(f"no TF dtype for numpy {dtype}")


def from_storage(array: np.ndarray, dtype: DType) -> np.ndarray:
    """Sub-byte integers decoded from TF's one-element-a-byte storage (low bits, signed)."""
    if not dtype.bits:
        return array
    bits = dtype.bits
    low = array.view(np.uint8) & np.uint8((1 << bits) - 1)
    if dtype.name.startswith("u"):
        return low
    sign = np.uint8(1 << (bits - 1))
    return ((low ^ sign).astype(np.int8) - np.int8(sign)).astype(np.int8)
