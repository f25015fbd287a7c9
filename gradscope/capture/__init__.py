"""gradscope.capture."""
