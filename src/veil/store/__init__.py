"""The feature store: what is kept instead of the images, and its life.

    format.py     the format: safetensors shards + manifest, reading, verify, the files a kill may leave
    obfuscate.py  `veil obfuscate`: images through a run's frozen obfuscator (or a client file) into a new store, or --append
    export.py     `veil store-export`: a store as one Parquet file for other engines
    erase.py      `veil erase`: items removed for good, the erasure logged
    dataset.py    `veil.open_store`: a store as a torch Dataset, a few shards cached; ShardShuffle
    classify.py   `veil train-classifier` (a classifier from a store alone) and `veil predict`
    idmap.py      the id map kept outside the store: which source item got which id
    location.py   where a store lives: a local folder or any fsspec URL

It imports the client, the training core (runs, data, runtime) and the leaves below them, never the attack or the report.
"""
