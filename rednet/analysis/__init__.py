"""Model analysis: complexity counting (``complexity``), involution kernel capture and plots
(``kernels``, ``plot``), and the distinct involution calls of a network (``shapes``); the input
pipeline's CPU cost (``inputbench``, for ``tools/benchmark.py data``)."""
