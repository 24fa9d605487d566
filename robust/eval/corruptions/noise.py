"""noise corruptions."""
