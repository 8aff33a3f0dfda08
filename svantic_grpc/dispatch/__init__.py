"""Transports from the mesh to remote agents that live outside the core (A2A)."""
