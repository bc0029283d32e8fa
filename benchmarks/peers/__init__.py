"""What users would run instead of q-curate's scorer, re-implemented from the public descriptions (no code copied),
so `make bench` can measure them on the same rows, model and machine."""
