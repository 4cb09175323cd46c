"""The study's datasets by name, and which of them carry images (a data fact, read by configs/ and lora_jax.run)."""

DATASETS = ("fincot", "govreport", "medmcqa", "medreason", "cocohd", "llavacot", "invoiceocr", "planted")
IMAGE_DATASETS = ("llavacot", "invoiceocr")  # examples with an image: a LLaVA base and an <image> placeholder
