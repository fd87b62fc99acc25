"""trimode: compile and deploy tri-mode diffusion language models."""

__version__ = "0.1.0"
