"""The models of the FLUX.1 system as plain `nn.Module`s: the MMDiT transformer, the autoencoder, the text encoders
and the Redux image projector. Nothing here reads files or changes process-wide state; `rectiflux.weights` builds
these modules from checkpoints."""
