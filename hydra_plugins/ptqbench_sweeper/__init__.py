"""Hydra sweeper for ptqbench: the basic sweeper, plus an experiment's explicit `jobs:` list
(harness/run/jobs.py). Hydra only loads sweepers from the `hydra_plugins` namespace."""
