"""The fincot study dataset."""
