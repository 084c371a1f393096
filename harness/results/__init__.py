"""Run records and what is made of them: the store, record frames, tables (paper layouts,
alignment, reproduction), renderers, plots, the `ptqbench-report` command and tracking."""
