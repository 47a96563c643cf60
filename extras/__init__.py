"""Short files around stem_jepa.py: library search, the HEAR API, layout converters."""
