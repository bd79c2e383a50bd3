"""TrimVLM online half: serving code with no torch on its default path."""
