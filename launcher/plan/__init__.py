"""The plan: from a sweep file and ``key=value`` overrides to the trials, packs and checks, running nothing.

- ``schema``     the sweep file: ``Sweep`` and ``PlannedTrial``, the shipped sweeps, overrides, every check of
                 the sweep's own keys (``load_sweep``, ``sweep_from_dict``, ``expand_datasets``)
- ``trials``     ``plan_trials``: grid points x datasets x seeds x stages, each a resolved TrialConfig; stage 2's
                 selection on val200 (``select_best``)
- ``packing``    which trials share one frozen forward pass (``assign_packs``, ``packs_of``, memory budget)
- ``checks``     ``validate``: storage, outputs, data folders and lists, checkpoints, precision, resources and
                 split leaks, all before any cluster resource is taken
- ``estimates``  images per split (registry sizes, both stages), the K/V cache plan, where trials compute
- ``planfile``   ``plan.json`` and ``sweep.yaml`` of a sweep folder (written once every check has passed)
- ``dryrun``     the ``--dry-run`` text
- ``resume``     a resumed sweep with a changed plan: kept, new, changed and dropped runs

Nothing here starts a process or imports Ray or another launcher folder, so a bad sweep fails before a cluster
is touched; it writes only the plan files and moves superseded runs aside, when ``launcher/run/`` asks. It reads
synqt's config, data facts, weights files and run directories, and asks the model and training code for
estimates and checks (memory, precision, outputs, the K/V cache plan).

May import: synqt.config, synqt.data, synqt.errors, synqt.model, synqt.shipped, synqt.run, synqt.storage,
synqt.training, synqt.weights
"""
