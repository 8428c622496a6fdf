"""holysheep-mesh data plane: an Envoy External Processing server for LLM egress."""
