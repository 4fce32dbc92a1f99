"""Package data: the small English corpus the demo model's tokenizer is trained on."""
