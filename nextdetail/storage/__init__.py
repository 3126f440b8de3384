"""Storage: stores (local or fsspec), content hashes, image codecs, sources, shards, manifests."""
