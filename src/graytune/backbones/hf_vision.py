"""Placeholder: the hf_vision provider is being written (it registers nothing yet)."""
