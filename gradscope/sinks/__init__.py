"""gradscope.sinks."""
