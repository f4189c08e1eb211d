"""burst-jupyter: run a notebook cell on a rented GPU for a known, capped price."""
