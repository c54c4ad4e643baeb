"""Training: the rectified-flow and autoencoder objectives and the resumable, distributed `Trainer`."""
