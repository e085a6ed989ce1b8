"""suprem_net: self-configuring 3D CT segmentation starting from supervised pre-trained backbones."""

__version__ = "0.1.0"
