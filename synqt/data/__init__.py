"""Data: VTAB-1k / FGVC folders as they are on disk, and the images a trial trains on.

- ``splits``      layouts (vtab_json, vtab_txt, fgvc_json), list files parsed to ``SplitList``, official split
                  sizes, ``read_split``, ``validate_dataset``
- ``images``      the official transform (PIL decode, RGB, square resize) and the decoded-image cache
- ``check``       ``synqt data check``: every folder's layout, lists, images, classes and split leaks
- ``leaks``       split leaks: pairs of splits that must be disjoint, by file and by pixel hash
- ``listfiles``   list files as editors write them (encodings, invisible characters, Windows paths)
- ``imagemodes``  every Pillow image mode to 8-bit RGB by its value range
- ``registry``    the dataset facts (order, group, classes, aliases, split sizes) read from configs/datasets.yaml
- ``synthetic``   the synthetic VTAB-style benchmark and source task of the demo and the tests

Nothing here builds a model or trains: the data layer sits below the config.

May import: synqt.errors, synqt.shipped, synqt.storage
"""
