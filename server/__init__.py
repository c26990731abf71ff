"""The HTTP server and the palm-serve command line."""
