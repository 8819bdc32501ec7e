"""Data: the sources (shapes64, emoji, a URL list), their download into webdataset shards,
the streams that read the shards, and DVC versioning of the data folder."""
