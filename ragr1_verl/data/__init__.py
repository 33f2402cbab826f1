"""Dataset preparation for both training stages and evaluation (the ``ragr1-data`` CLI and the SFT dataset)."""
