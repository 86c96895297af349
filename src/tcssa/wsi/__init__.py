"""From a whole-slide image file to patch features (issue 14): the step before ``tcssa.io.features``.

Modules:

- ``tcssa.wsi.slide``: opening a slide file (OpenSlide first, tiffslide as the fallback), its
  levels and pixel size (``SlideInfo``), reading regions and thumbnails, the magnification rule.
- ``tcssa.wsi.tiling``: the grid of tiles at a target magnification (``tile_slide`` ->
  ``TileGrid``), reading one tile (``read_tile``) and ``TileDataset`` for a DataLoader.

This ``__init__`` imports nothing: ``import tcssa.wsi`` stays cheap and loads no torch. Import the
module you need (``from tcssa.wsi.slide import open_slide``).
"""
