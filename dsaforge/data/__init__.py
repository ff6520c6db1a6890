"""Corpus ingestion, tokenizer training and packed Parquet token shards."""
