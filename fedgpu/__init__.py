"""fedgpu: Flower clients that hold GPU memory only while they train.

The package root stays import-light: the parent side of a federation (client
nodes, server, launcher, reports) must never import torch.
"""

__version__ = "0.1.0"
