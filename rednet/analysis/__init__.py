"""Model analysis: complexity counting (``complexity``), involution kernel capture and plots
(``kernels``, ``plot``), and the distinct involution calls of a network (``shapes``)."""
