"""Pure CoNRec building blocks. Nothing in this package imports verl."""
