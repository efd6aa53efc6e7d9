"""Pre-tokenised per-domain token shards: the format (``indexed``), encoding and the tokenizer's identity
(``encode``), the shard directory and its manifest (``shards``), and the ``rnb tokenize`` job (``job``)."""
