"""TransMiter: extract an adaptation from a weak backbone's logits, move it to a stronger one forward-only."""
