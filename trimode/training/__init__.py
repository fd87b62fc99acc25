"""Training of small tri-mode checkpoints with the joint AR + block-diffusion objective (spec §9)."""
