"""Writing a state dict in the safetensors format, streamed into an open output.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header
length, a JSON header (each tensor's dtype, shape and byte range; ``__metadata__``), padded
with spaces to 8 bytes, then the tensors' bytes, row-major. Written here tensor by tensor
into :class:`tfcompat_ema.output.AtomicOutput`, so that a 1 GB state is never held twice in
memory (``safetensors.torch.save`` builds one bytes object of the whole file). Read the
file with ``safetensors.torch.load_file``.
"""
from __future__ import annotations

import json
import struct
from typing import Callable, Dict, Mapping

import torch

#: torch dtype -> safetensors dtype name.
DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e5m2: "F8_E5M2", torch.float8_e4m3fn: "F8_E4M3",
}


def header(tensors: Mapping[str, torch.Tensor], metadata: Dict[str, str]) -> bytes:
    """The file's first bytes: header length and JSON header; ValueError for a dtype the
    format has no name for (nothing is written by then)."""
    entries: Dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"{name!r}: safetensors has no {tensor.dtype}")
        size = tensor.numel() * tensor.element_size()
        entries[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                         "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write(tensors: Mapping[str, torch.Tensor], out: Callable[[bytes], None],
          metadata: Dict[str, str]) -> None:
    """Write ``tensors`` through ``out``: the :func:`header`, then each tensor's bytes.

    >>> import io, torch
    >>> from safetensors.torch import load
    >>> buffer = io.BytesIO()
    >>> write({"w": torch.arange(3.0)}, buffer.write, {"source": "doctest"})
    >>> load(buffer.getvalue())["w"]
    tensor([0., 1., 2.])
    """
    out(header(tensors, metadata))
    for tensor in tensors.values():
        if tensor.numel():
            out(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
