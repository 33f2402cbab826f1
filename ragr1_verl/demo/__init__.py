"""``ragr1-verl-demo``: both stages of RAG-R1 on this machine's CPU with embedded defaults.

- :mod:`.cli`: the launcher (stage 1, stage 2, the evaluation, resumable);
- :mod:`.presets`: what the quick and the full preset train with;
- :mod:`.assets`: the demo model, questions and SFT data the CPU recipes name (``${ragr1_cpu_demo:...}``);
- :mod:`.sft_data`: the stage-1 trajectories the scripted teacher writes for the demo questions;
- :mod:`.retriever`: the demo retriever, served in-process;
- :mod:`.report`: the table that compares the run's models;
- :mod:`.processes`: the trainers' subprocesses, their logs, and their process trees stopped as a whole.
"""
