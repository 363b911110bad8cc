"""Small shared helpers: image grids (`images`), typed config sections from mappings and overrides (`config_parsing`)."""
