"""Models built from the library's invertible layers."""
