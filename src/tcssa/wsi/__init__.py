"""From a slide file to tiles and features: slide reading, tissue detection, tiling, encoders, extraction."""
