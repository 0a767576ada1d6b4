"""Tokenizer, synthetic tasks, dataset readers, grain pipelines and batch builders."""
