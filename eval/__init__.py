"""The study's evaluation: one metric per module, the suites that run them, and mode=eval."""
