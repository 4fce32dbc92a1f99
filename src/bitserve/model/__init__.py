"""Model config, weights and the BitNet b1.58 forward pass."""
