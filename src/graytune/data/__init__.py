"""Data sets in the formats users bring, and the real sets installed on this machine."""
