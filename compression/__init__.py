"""TrimVLM offline half: the model family, data, training, compression and export (torch)."""
