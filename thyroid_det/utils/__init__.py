"""Small helpers shared by the package and its tools."""
