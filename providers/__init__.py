"""burst_jupyter.providers: one module per provider, a protocol, a GPU catalog."""
