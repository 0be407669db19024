"""Running a plan: the commands, stage driving, and the executors that call ``synqt.training.run_pack``.

- ``commands``     ``synqt sweep`` / ``synqt demo``: load, plan, validate, claim the sweep folder, hand to a backend
- ``stages``       the order of a sweep's work (stage 1, selection on val200, stage 2) and ``run_sequential``
- ``ray_backend``  the ONLY module of the project importing Ray: one Tune trial per pack, Ray Train for DeepSpeed
- ``slurm``        ``synqt slurm``: one SLURM array task per trial, no Ray
- ``cluster``      what a sweep's trials ask for against what the cluster has (pure: no Ray import)
- ``gpu_check``    ``synqt gpu-check``: the prepared run of every CUDA path (docs/gpu.md)

May import: synqt, launcher.console, launcher.plan, launcher.results
"""
