"""Applications over the library: the demo, slot analysis, the classic-MIL protocol, the VQA demo.

Each reads like a script over ``tcssa.data``, ``tcssa.mil``, ``tcssa.train``, ``tcssa.vlm`` and
``tcssa.viz``; nothing in the library imports from here.
"""
