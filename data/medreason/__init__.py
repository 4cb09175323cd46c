"""The medreason study dataset."""
