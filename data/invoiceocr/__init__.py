"""The invoiceocr study dataset."""
