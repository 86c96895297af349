"""From a slide file to tiles, features and slot tokens: slides, tissue, tiling, patch encoders."""
