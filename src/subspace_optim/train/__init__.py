"""The pretraining command (``subspace-optim train``): configs, data, model, loop."""
