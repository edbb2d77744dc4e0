"""The paper's hyper-parameter grids (``grid``), SLURM array scripts rendered from them (``slurm``)
and the local sweep runner (``runner``)."""
