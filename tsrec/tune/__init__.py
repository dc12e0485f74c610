"""Ray Tune sweeps, the pure parts: search-space parsing, the resource check, the results table, plots,
best-config writing. A trial is an SFT run (its valid ranking probe is ``tsrec.train.ranking``). No Ray
import here; the Tuner and each trial's ``TorchTrainer`` (``fit_trainer``) live in :mod:`tsrec.orchestration`."""
