"""Stage 1 at training time: the SFT dataset verl's ``sft_trainer`` loads (:mod:`.dataset`) and the choice of
the checkpoint with the lowest validation loss (:mod:`.checkpoints`)."""
