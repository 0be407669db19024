"""Backbone weights and trained state on disk: what a file is, how it loads, and what it fits.

- ``identify``    what a checkpoint file is (safetensors, torch zip, npz, cut off, text ...), its ViT geometry
                  against the backbone's, and the ``checkpoint=random`` rule
- ``checkpoint``  loading backbone weights through key maps (timm / official / MAE names), official SynQT state
                  dicts in and out, trainable-only files (``trainable.safetensors`` + ``trainable.json``)
- ``compat``      does stored state fit what it is about to be used with (a resume, a weights file)

May import: synqt.config, synqt.errors, synqt.run, synqt.storage
"""
