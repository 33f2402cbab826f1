"""The RAG-R1 protocol, in one place that the rollout, the SFT data, the evaluation and the reward share.

- :mod:`~ragr1_verl.protocol.actions`: the tags and what a round's text asks for (search queries, answer);
- :mod:`~ragr1_verl.protocol.observation`: retrieved documents as the model reads them, within a budget;
- :mod:`~ragr1_verl.protocol.prompts`: the question's prompt and the template a model was trained with.

Nothing here imports verl, a tokenizer library or a network client.
"""
