"""Deployment runtime: the pieces that move features between edge and cloud."""
