"""ragr1-verl: the RAG-R1 recipe (multi-query search, SFT then outcome-reward RL) as a verl plugin."""

__version__ = "0.1.0"
