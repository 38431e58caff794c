"""Data: records from CSV / TSV / JSON files with their line numbers, labelled texts, instruction
conversations with their loss masks, plain-text corpora, and batching (length buckets, padding,
packing). Shared by training and evaluation; knows no model."""
