"""Orchestration of SynQT sweeps: plan, run, read the results.

Rooms (each folder's ``__init__`` says what lives there and what it may import):
  plan/      the sweep file, trial planning, packing, checks, estimates, plan.json, the dry run (runs nothing)
  run/       the commands, stage driving, the Ray backend (the only module importing Ray), the SLURM array
  results/   aggregate, report, plots, compare, status: readers of run directories
  sbatch/    the shipped sbatch scripts (package data; the checkout links slurm -> launcher/sbatch)

Top-level modules and what each may import:
  console.py   may import: synqt.run, launcher.results
  cli.py       may import: synqt, launcher
"""
