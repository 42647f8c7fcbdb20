"""Learned priors behind small protocols: depth estimators and image refiners."""
