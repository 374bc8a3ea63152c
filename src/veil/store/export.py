"""`veil store-export STORE OUT`: a store as one Parquet file (pyarrow), for the tools the data already lives in
(pandas, Polars, DuckDB, Spark, Hugging Face `datasets.load_dataset("parquet", ...)`).

One row per item, in the store's order:
    id        string, the item's 128-bit id as 32 hex digits (what `veil erase --ids` takes)
    label     int64, the class index (the class names are in the metadata)
    features  fixed-size list of C*H*W values, the feature map flattened row-major (C, then H, then W):
              a quantising obfuscator's integer codes as stored (uint8 / int16 / int32; value = code / (2^b - 1)),
              else float32 (float16 and bfloat16 widen to it exactly: not every engine reads Parquet's float16)
The file's metadata key `veil` holds the manifest's identity (store id, obfuscator fingerprint, dataset and classes,
feature shape and dtype, count, the labels' and items' digests, the erasures so far) as JSON. The copy does not
follow the store: after `veil erase` it still holds the erased items, and must be exported again.

Every shard is checked (veil verify's checks) as it is read; the file is written under a temporary name and renamed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from veil.errors import StoreError
from veil.store.format import CODES, check_complete, check_listing, checked_shards, id_hex, read_manifest, utc_now
from veil.store.location import locate
from veil.version import __version__

FORMATS = ("parquet",)
EXPORT_FORMAT = "veil-store-export"
ARROW_CODES = {"uint8": pa.uint8(), "int16": pa.int16(), "int32": pa.int32()}


def schema(manifest: dict) -> pa.Schema:
    f = manifest["features"]
    value = ARROW_CODES[f["dtype"]] if f["dtype"] in CODES else pa.float32()
    identity = {
        "format": EXPORT_FORMAT, "format_version": 1, "veil_version": __version__, "exported_utc": utc_now(),
        "store_id": manifest.get("store_id"), "obfuscator": manifest["obfuscator"], "dataset": manifest["dataset"],
        "features": {**f, "parquet_type": str(value), "layout": "C x H x W, flattened row-major"}, "count": manifest["count"],
        "labels_sha256": manifest["labels_sha256"], "items_sha256": manifest.get("items_sha256"), "appends": len(manifest["appends"]),
        "erasures": sum(len(e["ids"]) for e in manifest["erasures"]),
    }
    fields = [pa.field("id", pa.string(), nullable=False), pa.field("label", pa.int64(), nullable=False),
              pa.field("features", pa.list_(value, math.prod(f["shape"])), nullable=False)]
    return pa.schema(fields, metadata={"veil": json.dumps(identity)})


def export_store(store: str | Path, out: str | Path, fmt: str = "parquet", progress: bool = True) -> dict:
    """Write the whole store to `out` (a local file) as `fmt`. Returns rows, bytes, the format and the path."""
    if fmt not in FORMATS:
        raise StoreError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    out = Path(out)
    if "://" in str(out):
        raise StoreError(f"{out}: store-export writes a local file; copy it elsewhere afterwards")
    if not out.parent.is_dir():
        raise StoreError(f"{out}: folder {out.parent} does not exist")
    if out.is_dir():
        raise StoreError(f"{out}: is a folder; give a file name such as store.parquet")
    loc = locate(store)
    manifest = read_manifest(loc)
    check_complete(loc, manifest)
    check_listing(loc, manifest)
    sch = schema(manifest)
    value_type = sch.field("features").type.value_type
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    rows = 0
    try:
        with pq.ParquetWriter(tmp, sch, compression="zstd") as writer:
            for _, shard in checked_shards(loc, manifest, progress, decode=False):
                features = shard["features"]
                flat = (features if manifest["features"]["dtype"] in CODES else features.to(torch.float32)).reshape(len(features), -1)
                values = pa.array(flat.reshape(-1).numpy(), type=value_type)
                table = pa.table({"id": pa.array(id_hex(shard["ids"]), pa.string()), "label": pa.array(shard["labels"].numpy(), pa.int64()),
                                  "features": pa.FixedSizeListArray.from_arrays(values, flat.shape[1])}, schema=sch)
                writer.write_table(table)
                rows += len(features)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"rows": rows, "bytes": out.stat().st_size, "format": fmt, "path": out}
