"""lytools: an offline toolkit for LoRA and LyCORIS network files."""

__version__ = "0.1.0"
