"""Hydra recipes of ragr1-verl (installed as the package ``ragr1_verl.recipes``); group ``recipe``."""
