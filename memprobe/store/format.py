"""How a store lies on disk: file names, the safetensors layout of a shard, the dtypes it holds.

Layout of a store directory::

    manifest.json               what was captured (config, sites, documents) and the shard list
    shard-00000.safetensors     one tensor per site, (rows, width), plus per-row tensors
    shard-00001.safetensors     ...

Per-row data (document index, position, token id, label columns) lives in the shards, not in the
manifest: the manifest is rewritten at every commit and must stay small.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch

from memprobe.errors import MemprobeError

FORMAT = "memprobe-activation-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
ROW_FIELDS = ("doc_index", "position", "token_id")
ROW_PREFIX = "__row__."
COLUMN_PREFIX = "__column__."
HEADER_PART = "__header__"  # pseudo tensor name for the checksum of a shard's header
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")


SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL",
}


def safetensors_parts(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> tuple[bytes, list[tuple[str, memoryview]]]:
    """A safetensors file as its header plus one zero-copy buffer per tensor (sorted by name).

    Why not `safetensors.torch.save`: it copies every byte into one Python bytes object, which costs
    as much as the write itself for the hundreds of MB a shard holds. The layout is the format's own
    (u64 header length, JSON header padded with spaces to 8 bytes, tensors back to back), so
    `safe_open` reads it like any other file.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    parts, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + view.nbytes],
        }
        parts.append((name, view))
        offset += view.nbytes
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, parts


def json_bytes(payload: dict[str, Any]) -> bytes:
    return (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode()


def itemsize(dtype: str) -> int:
    return torch.empty((), dtype=torch_dtype(dtype)).element_size()


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MemprobeError(f"unsupported store dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def shard_number(file: str) -> int:
    match = _SHARD_RE.match(file)
    return int(match.group(1)) if match else -1
