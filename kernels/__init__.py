"""Batched torch video kernels (issue 4). Nothing is built here yet."""
