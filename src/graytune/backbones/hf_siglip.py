"""Placeholder: the hf_siglip provider is being written (it registers nothing yet)."""
