"""Flow-matching schedules, denoise loops and the per-family stage functions."""
