"""Ray Tune sweeps, the pure parts: search-space parsing, the resource check, the results table, plots,
best-config writing and the valid ranking probe the SFT loop calls. No Ray import here; the Tuner and
the per-trial ``TorchTrainer`` live in :mod:`tsrec.orchestration.tune`."""
