"""weather corruptions."""
