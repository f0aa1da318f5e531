"""Model analysis: complexity counting and involution kernel capture."""
