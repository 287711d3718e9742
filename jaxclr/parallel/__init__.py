"""Meshes, shardings and host-to-global array assembly."""
