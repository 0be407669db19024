"""Results: readers of finished (or partly finished) sweeps, through ``synqt.run.rundir.scan_runs`` only.

- ``aggregate``    selection and means: the VTAB-1k table (per task, Natural / Specialized / Structured, mean
                   of groups, mean of tasks) and the files it writes
- ``tensorboard``  the sweep's own TensorBoard run: the HParams experiment (planned, then final), table, chart
- ``report``       runs.csv, results.csv, means.csv, the paper table (Markdown / LaTeX), results.md
- ``plots``        per-task accuracy, learning curves, accuracy vs cost (PNG 300 dpi + PDF)
- ``compare``      ``synqt compare``: sweeps and published CSV tables side by side
- ``status``       ``synqt status``: done / failed / broken / running / pending trials and the time left

Readers never train and never plan: nothing here imports synqt.training, synqt.model or a launcher folder.

May import: synqt.config, synqt.data, synqt.errors, synqt.run, synqt.storage
"""
