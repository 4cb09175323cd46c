"""The llavacot study dataset."""
