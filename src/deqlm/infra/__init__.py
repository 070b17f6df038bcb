"""Process-level plumbing: exits, atomic files, the run folder, devices, memory metering, logging."""
