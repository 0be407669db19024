"""The model: SynQT's query branch and the frozen timm ViT stream it reads, and what a training step costs.

- ``branch``     the query branch (QSM blocks, adapters, the instance-aware head; spec sections 1-2)
- ``stream``     the frozen stream and the models on it: ``build_backbone``, ``SynQT``, ``PackedSynQT``
                 (k branches over one frozen forward pass), ``new_branch``, ``build_model`` (spec section 3)
- ``memory``     what a step keeps for backward (memory modes) and the process's peak memory
- ``precision``  whether a device runs a precision natively, checked before any step

Every size comes from the backbone; nothing here moves tensors to a device (no ``.cuda()``).

May import: synqt.config, synqt.errors, synqt.weights
"""
