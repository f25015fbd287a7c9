"""gradscope.stats."""
