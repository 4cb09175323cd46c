"""The medmcqa study dataset."""
