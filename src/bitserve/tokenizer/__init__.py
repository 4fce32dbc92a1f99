"""BPE tokenizer from GGUF metadata, incremental detokenizer, chat templates."""
