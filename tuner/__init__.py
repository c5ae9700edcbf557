"""tpgate's tuner: Optuna studies over replica count x TP and engine knobs, per workload class."""
