"""The govreport study dataset."""
