"""Model analysis: complexity counting (``complexity``), involution kernel capture and plots
(``kernels``, ``plot``), and the distinct involution calls of a network (``shapes``); the input
pipeline's CPU cost (``inputbench``, for ``tools/benchmark.py data``); the CUDA kernels without a GPU: the
host emulation of ``involution.cu`` (``cuda_emu``, with ``cuda_emu.h``) and the SASS of the binary the runtime
builds (``sass``), for the kernel tests and ``tools/kernel_report.py``."""
