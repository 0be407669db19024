"""Tools around the method: they measure or prepare, and return data that the CLI prints.

- ``bench``     ``synqt bench``: saved-activation memory, peak memory and images/s of the memory modes
- ``kv_bench``  ``synqt bench --kv-cache``: the cached train step, the cache build rate, a paper trial's cost
- ``pretrain``  the brief pre-training of the demo ViT on the synthetic source task (``synqt demo``'s backbone)

Nothing in synqt/ imports a tool; launcher/ may.

May import: synqt
"""
