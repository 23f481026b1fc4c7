"""Multi-seed grids of attacks × defenses × operating rules (``reproduce.py``).

``config`` reads and checks a grid file, ``cells`` expands it into stage runs and runs one,
``executors`` hands cells to this machine, its GPUs or Slurm, ``report`` aggregates the cells'
``metrics.json`` into ``results.csv``, ``table.md`` and plots.
"""
