"""Task data and models: the embedded demo task (`synthetic`)."""
