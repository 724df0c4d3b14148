"""ASIF: coupled image-caption pairs turn two frozen unimodal encoders into a multimodal model."""

__version__ = "0.1.0"
