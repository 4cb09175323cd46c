"""The planted-answer study's dataset: a teacher's continuations of prompts, as token ids."""
