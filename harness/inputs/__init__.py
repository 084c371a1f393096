"""Pipeline inputs: models (hub, local, GGUF, tiny random), text data, calibration batches."""
