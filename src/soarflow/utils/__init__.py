"""Small shared helpers (image grids)."""
