"""Video analysis: batched torch frame kernels (CPU or CUDA), PyAV decoding,
shots, chapters, keyframes, quality and pacing (`analyze`), and synthetic
screen recordings for tests and benchmarks. Needs the `video` extra."""
