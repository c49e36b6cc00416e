"""Data sets: the MVTec AD layout loader and the synthetic generator."""
