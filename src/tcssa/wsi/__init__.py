"""From a whole-slide image file to patch features: the step before ``tcssa.io.features``.

Modules:

- ``tcssa.wsi.slide``: opening a slide file (OpenSlide first, tiffslide as the fallback), its
  levels and pixel size (``SlideInfo``), reading regions and thumbnails, the magnification rule.
- ``tcssa.wsi.tiling``: the grid of tiles at a target magnification (``tile_slide`` ->
  ``TileGrid``), reading one tile (``read_tile``) and ``TileDataset`` for a DataLoader.
- ``tcssa.wsi.tissue``: the tissue mask of a thumbnail (``detect_tissue`` -> ``TissueMask``);
  masks are saved and read as GeoJSON or images by ``tcssa.io.geojson``.
- ``tcssa.wsi.encoders``: patch encoders behind one registry (``build_encoder``): the capricorn
  DenseNet121 ported from its Keras file (1024-d, with 9 PathMNIST tissue-class probabilities),
  a handcrafted descriptor (weak, fast), ResNet50/UNI/UNI2/CONCH from local weight files, and a
  user's own (``module:callable``).
- ``tcssa.wsi.config``: ``ExtractConfig``, the options of ``tcssa extract`` (no torch).
- ``tcssa.wsi.extract``: one slide or a folder of slides to TRIDENT's output layout
  (``features_{encoder}/{slide}.h5`` through ``tcssa.io.features.FeatureFileWriter``, the tissue
  outline, thumbnails), resumable and sharded across torchrun processes.

This ``__init__`` imports nothing: ``import tcssa.wsi`` stays cheap and loads no torch. Import the
module you need (``from tcssa.wsi.slide import open_slide``).
"""
