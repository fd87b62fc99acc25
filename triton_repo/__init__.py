"""Triton Inference Server model repository writer, server launcher and client (see design.md)."""
