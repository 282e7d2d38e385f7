"""Record formats, tokenization, collators and DataModules."""
