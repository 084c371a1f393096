"""Orchestration: the `ptqbench` Hydra entry point (cli), run_one (pipeline), sweep overrides
and callbacks, the quantized-model cache, provenance and mixed-precision selection."""
