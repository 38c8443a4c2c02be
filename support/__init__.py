"""Helpers below checkpoint I/O and training: offline text corpora and token windows (`corpora`), and
results files written atomically (`results`)."""
