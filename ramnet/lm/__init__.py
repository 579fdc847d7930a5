"""Language modelling with RAM-Net and its baselines (`families.py`): data preparation, training (one
process, DDP or FSDP2), checkpoints, perplexity, generation and an lm-evaluation-harness adapter
(`ramnet data|train|eval|generate`)."""
