"""gradscope.reference."""
