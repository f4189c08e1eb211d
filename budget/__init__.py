"""burst_jupyter.budget: caps, reservations and the append-only ledger."""
