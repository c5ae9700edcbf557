"""The control plane: desired state and its rules, the controller (one writer, reconcile loop, drain), and
the typed client through which the admin API, the CLI and the tuner change it."""
