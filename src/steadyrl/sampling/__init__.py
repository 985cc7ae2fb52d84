"""The sampling layer: prompt selection, group filters and augmenters, reward shaping, per-prompt state and
the advantages that need it (``layer.SamplingLayer``; docs/methods/sampling.md)."""
