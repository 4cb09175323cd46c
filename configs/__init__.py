"""ml_collections config files: base.py owns the schema; one file per study arm."""
