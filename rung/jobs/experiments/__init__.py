"""Many trainings at once: hyperparameter sweeps and transfer, the scaling ladder and its fits, coordinate checks."""
