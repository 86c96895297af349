"""From a slide file to patch features: slides, tissue, tiles, patch encoders, extraction."""
