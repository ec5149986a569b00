"""Reading a run afterwards: `overnight status | logs | report | demo`."""
