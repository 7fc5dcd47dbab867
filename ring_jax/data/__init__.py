"""Data: embedded synthetic corpus, tokenizers, grain pipeline with sequence packing."""
