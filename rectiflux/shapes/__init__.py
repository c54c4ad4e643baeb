"""The shapes world of the embedded model: its definition and renderer (`world`), the checker that reads an image
back (`checker`), the measured quality of a model (`evaluate`), the tokenizers of its vocabulary (`tokenizers`) and
the embedded model's training recipe (`recipe`)."""
