"""From a slide file to tiles, features and slot tokens: reading slides, tissue detection, tiling, patch encoders."""
