"""ActivationStore: activations on disk as checksummed safetensors shards plus a JSON manifest.

A capture can be far larger than memory and may be killed, so a writer commits one shard of whole
documents at a time and a reader maps shards lazily, verifying checksums before trusting any byte.
One concept per module: `format` (file layout), `integrity` (checksums), `manifest` (schema),
`writer` (StoreWriter, resume) and `reader` (ActivationStore). Import the names from here.
"""

from memprobe.store.format import DTYPES, FORMAT, FORMAT_VERSION, MANIFEST, ROW_FIELDS
from memprobe.store.integrity import CHECKSUM
from memprobe.store.reader import ActivationStore, Row, RowTable
from memprobe.store.writer import StoreWriter, check_free_disk

__all__ = [
    "CHECKSUM",
    "DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "ROW_FIELDS",
    "ActivationStore",
    "Row",
    "RowTable",
    "StoreWriter",
    "check_free_disk",
]
