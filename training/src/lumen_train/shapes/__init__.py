"""The shapes world: a small image domain lumen's embedded model is trained
on end to end (VAE, text-to-image UNet, LUMEN ControlNet) and evaluated in,
by colour, as the paper evaluates real models."""
