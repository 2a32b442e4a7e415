"""Placeholder: the hf_text provider is being written (it registers nothing yet)."""
