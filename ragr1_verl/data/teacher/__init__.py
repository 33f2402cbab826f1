"""Teacher-generated trajectories for ``ragr1-data sft-generate``.

- :mod:`.episode`: one trajectory, run with the project's tag protocol and the real retriever;
- :mod:`.store`: the resumable attempts log, the kept (exact-match) file and the run manifest;
- :mod:`.selection`: the paper's stage-2 RL data selection;
- :mod:`.runner`: a whole run (workers, resuming, the kept file and the RL parquet files).

A model teacher is reached through :mod:`ragr1_verl.openai_client` (an OpenAI-compatible server,
``/v1/completions`` or ``/v1/chat/completions``, with retries), which the evaluation uses too.
"""
