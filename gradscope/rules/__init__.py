"""gradscope.rules."""
