"""FAISS index storage: build, atomic publication, checksummed mmap loading and search.

The names of the index store, in one place; the code lives in:

- ``index.manifest``: on-disk layout, manifests, discovery, weights check (no faiss)
- ``index.points``: the id->point table and the checks of vectors and points
- ``index.build``: publication (``publish_index``)
- ``index.chunked``: large compressed indexes filled chunk by chunk (``publish_index_chunked``)
- ``index.search``: loading (``load_index``) and searching (``LoadedIndex``)
- ``index.exact``: exact vectors on disk, re-ranking, exact top-k
- ``index.faiss_helpers``: factories, training, IVF parameters, devices
- ``index.files``: durable writes and checksums

These are the only modules that build or load FAISS indexes.
"""

from __future__ import annotations

# Names outside __all__ are imported from here too (constants, private names used by tests):
# the imports that carry them say noqa: F401.
from index.build import publish_index
from index.chunked import compressed_factory, publish_index_chunked
from index.exact import ExactVectors, exact_top_k, recall_1_at_k, rerank  # noqa: F401
from index.faiss_helpers import (  # noqa: F401
    DEVICES,
    QUANTIZER_EF,
    gpu_count,
    ivf_params,
    select_device,
)
from index.manifest import (  # noqa: F401
    COLOUR_FILE,
    COUNTRY_FILE,
    DATA_FILES,
    EXACT_FILE,
    GALLERY_KINDS,
    IDS_FILE,
    INDEX_FILE,
    LATLON_FILE,
    MANIFEST_FILE,
    METRIC,
    ONDISK_FILE,
    STRUCTURE_FILE,
    WEIGHTS_KEY,
    WIDTH_FILE,
    IndexStoreError,
    IndexWeightsError,
    Manifest,
    check_weights,
    latest_version,
    list_indexes,
    new_version,
    remove_unfinished,
)
from index.points import PointTable, VectorChunk
from index.search import (  # noqa: F401
    SMALL_QUERY_BATCH,
    LoadedIndex,
    load_index,
    structure_codes,
)

__all__ = [
    "WEIGHTS_KEY",
    "ExactVectors",
    "IndexStoreError",
    "IndexWeightsError",
    "LoadedIndex",
    "Manifest",
    "PointTable",
    "VectorChunk",
    "check_weights",
    "compressed_factory",
    "exact_top_k",
    "gpu_count",
    "latest_version",
    "list_indexes",
    "load_index",
    "publish_index",
    "publish_index_chunked",
    "recall_1_at_k",
    "remove_unfinished",
    "select_device",
]
