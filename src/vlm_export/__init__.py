"""vlm-export: make a vision-language model fast and servable, and prove it still answers the same."""
__version__ = "0.1.0"
