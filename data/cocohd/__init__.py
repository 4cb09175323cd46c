"""The cocohd study dataset."""
