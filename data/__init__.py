"""Study datasets as tensorflow-datasets builders, and the SFT input pipeline (host numpy only)."""
