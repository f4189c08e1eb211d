"""Widgets and text views: they render the JobEvent stream and budget snapshots, nothing else."""
