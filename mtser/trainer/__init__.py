"""Trainer: store loader, fusion model, losses, metrics, training loop, Ray Tune search, ensembles, predictions."""
