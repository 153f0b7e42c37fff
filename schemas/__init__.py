"""The shapes of everything hookgate exchanges: no I/O, nothing of ours imported."""
