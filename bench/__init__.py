"""Loopback benchmark of the holysheep-mesh data plane: `python -m bench --help`."""
