"""Gaussian parameters, initialisation, appearance model, 3D filter and densification."""
