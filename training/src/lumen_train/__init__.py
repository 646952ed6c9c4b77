"""lumen-train: train the LUMEN ControlNet from a folder of images, label-free.

`lumen layouts` (the Rust binary) exports the neural layouts of the images
exactly as serving computes them; this package trains a diffusers
`ControlNetModel` whose conditioning is that K-channel layout, on PyTorch,
diffusers and accelerate, and exports a complete lumen model folder.
"""

__version__ = "0.1.0"
