"""What a run leaves and says: the run-directory contract and everything written while a trial runs.

- ``rundir``      the run-directory contract: file names, atomic writers, ``read_run`` / ``scan_runs`` (the one
                  reader of aggregate, status, the stage driver and the Ray backend), trial identity
- ``ownership``   one live owner per sweep folder and run directory (``owner.json``: claim, renewal, takeover)
- ``tblog``       TensorBoard HParams: one session per run, one experiment per sweep
- ``progress``    progress events (train start, step, epoch end, eval, trial end): trainers emit, never print
- ``provenance``  what a result was produced with: library versions, code commit, the data's formats

May import: synqt.config, synqt.errors, synqt.storage, synqt.version
"""
